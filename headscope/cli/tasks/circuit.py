"""``--task circuit``: per-head patching scores from clean/corrupted pairs (Merullo et al. 2023).

    headscope score --task circuit --pairs pairs.jsonl [--method activation|attribution|path]
    headscope score --task circuit --pairs pairs.jsonl --method attribution --ig-steps 8   # EAP-IG
    headscope score --task circuit --generate ioi|colored-objects [--n 64]
"""

from __future__ import annotations

from headscope.analyzers import circuits
from headscope.cli.registry import register_task
from headscope.errors import HeadscopeError
from headscope.heads import EXAMPLES, parse_heads
from headscope.tasks.circuit_pairs import encode_pairs, load_pairs
from headscope.tasks.colored_objects import colored_objects_pairs
from headscope.tasks.ioi import ioi_pairs
from headscope.validate import positive_int


@register_task("circuit", default_model="retrieval")
def add_arguments(parser, command: str) -> None:
    parser.add_argument("--pairs", help='JSONL: {"clean", "corrupt", "answer", "wrong"} per line')
    parser.add_argument("--generate", choices=("ioi", "colored-objects"), help="use a shipped task generator")
    parser.add_argument("--n", type=positive_int, default=64, help="pairs to generate")
    if command == "score":  # `eval` already has --seed
        parser.add_argument("--seed", type=int, default=0, help="seed of the generated data")
    parser.add_argument("--method", choices=("activation", "attribution", "path"), default="activation")
    parser.add_argument("--ig-steps", type=int, default=1,
                        help="attribution: average the gradient over this many corrupt-to-clean steps "
                             "(EAP-IG, Hanna et al. 2024); 1 = plain attribution patching")
    parser.add_argument("--receivers", metavar="NAMES",
                        help=f"path patching receivers (default: the logits): {EXAMPLES}")


def pairs(args):
    if bool(args.pairs) == bool(args.generate):
        raise HeadscopeError("give exactly one of --pairs FILE or --generate ioi|colored-objects")
    if args.pairs:
        return load_pairs(args.pairs), False
    if args.generate == "ioi":
        return ioi_pairs(args.n, args.seed), True

    return colored_objects_pairs(args.n, args.seed), True


def check(args) -> None:
    if args.pairs:
        load_pairs(args.pairs)


def can_shard(args) -> bool:
    return args.method in ("activation", "path")  # attribution patching is one backward pass


def score(args, hm):
    raw, generated = pairs(args)
    groups = encode_pairs(hm.tokenizer, raw, drop_mismatched=generated)
    shard = getattr(args, "shard", None)
    if args.method == "activation":
        return circuits.activation_patching(hm, groups, heads_per_batch=args.batch_size, progress=not args.quiet,
                                            shard=shard)
    if args.method == "attribution":
        return circuits.attribution_patching(hm, groups, steps=args.ig_steps)
    return circuits.path_patching(hm, groups, receivers=parse_heads(args.receivers) if args.receivers else None,
                                  heads_per_batch=args.batch_size, progress=not args.quiet, shard=shard)
