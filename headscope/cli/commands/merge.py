"""``headscope merge``: join the parts of a sharded sweep (``score --shard I/N``) into one ranking.

    headscope score --task safety --method ships --shard 0/4 --out parts/ships.0   # ... 3/4
    headscope merge parts/ships.* --out ships.csv

The merged ranking is the one a single unsharded run gives, bit for bit (headscope.sharding). Parts
of different runs (another model, task option, input file, batch size or shard count), a shard
given twice or left out are refused, naming the field that differs; ``--force`` merges parts made
with different models (weights hashes) anyway.
"""

from __future__ import annotations

import argparse

from headscope.sharding import merge

NAME = "merge"
HELP = "join the parts of a sharded sweep (score --shard I/N) into the ranking one run gives"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("parts", nargs="+", help="the part files, one per shard")
    parser.add_argument("--out", help="write the ranking CSV here (plus a .json metadata sidecar)")
    parser.add_argument("--show", type=int, default=10, help="how many top heads to print")
    parser.add_argument("--force", action="store_true",
                        help="merge parts made with different models (their weights hashes differ) anyway")


def run(args) -> int:
    scores = merge(args.parts, force=args.force)
    print(f"{scores.method} scores of {scores.model}, merged from {len(args.parts)} parts")
    print(scores.to_frame().head(args.show).to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    if args.out:
        scores.to_csv(args.out)
        print(f"wrote {args.out}")
    return 0
