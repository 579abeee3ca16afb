"""``headscope generate``: generate text with heads ablated, reweighted, a task embedding injected, or with DeCoRe decoding.

    headscope generate --model M --prompt "..." [--ablate r.csv --top K | --scale r.csv --top K --alpha A
                       | --decore r.csv --top K] [--max-new-tokens N]
    headscope generate --model M --prompt "..." --ablate --heads L1H5,L1H4    # heads by name
    headscope generate --model M --image I --prompt "USER: <image> ..." [--vhr vhd.csv] [--var] [--edits e.json]

The edit flags (``--edits``, ``--vhr``, ``--var``, ``--inject``: ``headscope.commands.edit_flags``) compose with
--ablate / --scale.

The last line printed is the generated continuation.
"""

from __future__ import annotations

import argparse

import torch

from headscope.commands import edit_flags
from headscope.cli import add_device_arguments, add_heads_arguments, load_model
from headscope.errors import HeadscopeError
from headscope.validate import positive_int

NAME = "generate"
HELP = "generate from a prompt, optionally with heads ablated, scaled, or DeCoRe decoding"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="retrieval", help="shipped organism, local folder or hub id")
    parser.add_argument("--prompt", required=True, help="the prompt text (with an image model: holding <image>)")
    parser.add_argument("--image", default=None, help="image file (PNG/JPEG) for an image-text model")
    add_device_arguments(parser)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-new-tokens", type=positive_int, default=16)
    parser.add_argument("--ablate", metavar="CSV", nargs="?", const="",
                        help="ablate this ranking's --top K heads (or, without CSV, the --heads named)")
    parser.add_argument("--ablation", choices=("zero", "uniform"), default="zero")
    parser.add_argument("--scale", metavar="CSV", nargs="?", const="",
                        help="multiply the output of this ranking's top heads (or the --heads named) by --alpha")
    parser.add_argument("--alpha", type=float, default=2.0, help="with --scale: the factor (negative allowed)")
    parser.add_argument("--decore", metavar="CSV", nargs="?", const="",
                        help="DeCoRe: contrast with this ranking's top heads (or the --heads named) masked")
    parser.add_argument("--decore-alpha", type=float, default=None, help="fixed DeCoRe alpha (default: entropy)")
    add_heads_arguments(parser)
    parser.add_argument("--scope", choices=("both", "prefill", "decode"), default="both",
                        help="with --ablate/--scale: edit the prompt, the generated tokens, or both")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--seed", type=int, default=0)
    edit_flags.add_arguments(parser)


def run(args) -> int:
    from headscope.interventions import Edit, intervene
    from headscope.interventions.decore import decore_generate
    from headscope.cli import check_edit_heads, edit_heads, edit_mode
    from headscope.heads import format_heads

    mode = edit_mode(args)
    check_edit_heads(args, mode)
    if args.image is not None:
        from headscope import vision

        vision.load_image(args.image)
    hm = load_model(args)
    if hm.tokenizer is None:
        raise HeadscopeError(f"{args.model} has no tokenizer; generate needs one to encode the prompt")
    if args.image is not None:
        from headscope import vision

        inputs = vision.encode(hm, [args.image], [args.prompt])
    else:
        inputs = {"input_ids": torch.tensor([hm.tokenizer(args.prompt)["input_ids"]], device=hm.device)}
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    ids = inputs["input_ids"]
    flagged = edit_flags.build_edits(args, hm)
    heads = edit_heads(args, hm, mode)[0] if mode != "none" else []
    tok = hm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    torch.manual_seed(args.seed)
    if mode == "decore":
        if flagged or args.image is not None:
            raise HeadscopeError("--decore runs its own decoding loop on text prompts; drop --image/--vhr/--var/--edits")
        print(f"DeCoRe, masking {format_heads(heads)}")
        out = decore_generate(hm, ids, heads, max_new_tokens=args.max_new_tokens, alpha=args.decore_alpha,
                              do_sample=args.sample, generator=torch.Generator(hm.device).manual_seed(args.seed),
                              eos_token_id=tok.eos_token_id, pad_token_id=pad).sequences
    else:
        edits = []
        if mode == "ablate":
            edits = [Edit("zero" if args.ablation == "zero" else "uniform", heads, scope=args.scope)]
            print(f"ablating ({args.ablation}, {args.scope}) {format_heads(heads)}")
        elif mode == "scale":
            edits = [Edit("scale", heads, strength=args.alpha, scope=args.scope)]
            print(f"scaling by {args.alpha:g} ({args.scope}) {format_heads(heads)}")
        for edit in flagged:
            print(f"edit: {edit.kind} on {len(edit.heads) or 'all'} heads, strength {edit.strength}"
                  + (f", options {edit.options}" if edit.options else ""))
        with torch.no_grad(), intervene(hm, edits + flagged):
            out = hm.model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                                    pad_token_id=pad)
    print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return 0
