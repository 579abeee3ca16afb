"""``--task induction | previous-token | duplicate-token``: classic head types with TransformerLens
head_detector semantics, scored on repeated random token sequences (like TL's demos).

    headscope score --task induction --model M [--sequences 10 --half-length 32]
"""

from __future__ import annotations

from headscope.analyzers import classic
from headscope.cli.registry import register_task
from headscope.errors import HeadscopeError
from headscope.validate import positive_int


@register_task("induction", "previous-token", "duplicate-token", default_model="retrieval")
def add_arguments(parser, command: str) -> None:
    parser.add_argument("--sequences", type=positive_int, default=10, help="random sequences")
    parser.add_argument("--half-length", type=int, default=None,
                        help="tokens before the repeat (default 32, fewer if the model has fewer positions)")
    if command == "score":  # `eval` already has --seed
        parser.add_argument("--seed", type=int, default=0, help="seed of the generated data")
    parser.add_argument("--exclude-bos", action="store_true", help="TL's exclude_bos")
    parser.add_argument("--exclude-current-token", action="store_true", help="TL's exclude_current_token")


def score(args, hm):
    half = args.half_length
    if half is None:
        limit = hm.geometry.max_positions
        half = 32 if limit is None else min(32, (limit - 1) // 2)
    if args.sequences < 1 or half < 1:
        raise HeadscopeError("--sequences and --half-length must be >= 1")
    tokens = classic.repeated_random_tokens(hm, args.sequences, half, args.seed)
    return classic.head_type_scores(hm, args.task, tokens, exclude_bos=args.exclude_bos,
                                    exclude_current_token=args.exclude_current_token, batch_size=args.batch_size)
