"""``headscope generate``: generate text with heads edited (every edit kind's flags), or with DeCoRe decoding.

    headscope generate --model M --prompt "..." [--ablate r.csv --top K | --scale r.csv --top K --alpha A
                       | --decore r.csv --top K] [--max-new-tokens N]
    headscope generate --model M --prompt "..." --ablate --heads L1H5,L1H4    # heads by name
    headscope generate --model M --image I --prompt "USER: <image> ..." [--vhr per-input|vhd.csv] [--var] [--edits e.json]

The edit flags (``--ablate``, ``--scale``, ``--edits``, ``--vhr``, ``--var``, ``--inject``: generated
from the edit-kind registry by ``headscope.cli.edit_flags``) compose. DeCoRe is a method that owns
the decoding loop (headscope.methods.decore), not an edit.

The last line printed is the generated continuation.
"""

from __future__ import annotations

import argparse

import torch

from headscope import vision
from headscope.cli import edit_flags
from headscope.cli.common import add_device_arguments, check_edit_heads, edit_heads, edit_mode, load_model
from headscope.errors import HeadscopeError
from headscope.heads import format_heads
from headscope.hf.inputs import pad_id
from headscope.interventions import intervene
from headscope.interventions.edits import describe
from headscope.methods.decore import decore_generate
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
    edit_flags.add_arguments(parser)
    parser.add_argument("--decore", metavar="CSV", nargs="?", const="",
                        help="DeCoRe: contrast with this ranking's top heads (or the --heads named) masked")
    parser.add_argument("--decore-alpha", type=float, default=None, help="fixed DeCoRe alpha (default: entropy)")
    parser.add_argument("--scope", choices=("both", "prefill", "decode"), default="both",
                        help="with --ablate/--scale: edit the prompt, the generated tokens, or both")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    mode = edit_mode(args, [flag.name for _, flag in edit_flags.heads_flags()] + ["decore"])
    check_edit_heads(args, mode)
    _check_mode_options(args, mode)
    if args.image is not None:
        vision.load_image(args.image)
    hm = load_model(args)
    if hm.tokenizer is None:
        raise HeadscopeError(f"{args.model} has no tokenizer; generate needs one to encode the prompt")
    if args.image is not None:
        inputs = vision.encode(hm, [args.image], [args.prompt])
    else:
        if vision.is_vision_model(hm) and vision.placeholder(hm) in args.prompt:
            raise HeadscopeError(f"the prompt holds the image placeholder {vision.placeholder(hm)} but no --image was "
                                 "given; pass --image FILE (or drop the placeholder for a text-only prompt)")
        inputs = {"input_ids": torch.tensor([hm.tokenizer(args.prompt)["input_ids"]], device=hm.device)}
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    ids = inputs["input_ids"]
    flagged = edit_flags.build_edits(args, hm)
    heads = edit_heads(args, hm, mode)[0] if mode != "none" else []
    tok = hm.tokenizer
    pad = pad_id(tok)
    torch.manual_seed(args.seed)
    if mode == "decore":  # a method with its own decoding loop
        if flagged or args.image is not None:
            raise HeadscopeError("--decore runs its own decoding loop on text prompts; drop --image/--vhr/--var/--edits")
        print(f"DeCoRe, masking {format_heads(heads)}")
        out = decore_generate(hm, ids, heads, max_new_tokens=args.max_new_tokens, alpha=args.decore_alpha,
                              do_sample=args.sample, generator=torch.Generator(hm.device).manual_seed(args.seed),
                              eos_token_id=tok.eos_token_id, pad_token_id=pad).sequences
    else:
        edits = []
        if mode != "none":
            edits = edit_flags.heads_edits(args, hm, mode, heads)
            verb, details = edit_flags.describe(args, mode)
            print(f"{verb} ({', '.join(details + [args.scope])}) {format_heads(heads)}")
        for edit in flagged:
            print(f"edit: {describe(edit)}" + (f", options {edit.options}" if edit.options else ""))
        with torch.no_grad(), intervene(hm, edits + flagged):
            out = hm.model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                                    pad_token_id=pad)
    print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return 0


def _check_mode_options(args, mode: str) -> None:
    """--scope without a heads edit would be ignored: an error (--decore-alpha: common.edit_mode)."""
    if args.scope != "both" and mode in ("none", "decore"):
        heads = " or ".join(f"--{flag.name}" for _, flag in edit_flags.heads_flags())
        raise HeadscopeError(f"--scope {args.scope} applies to a heads edit ({heads}); without one it would be "
                             "ignored")
