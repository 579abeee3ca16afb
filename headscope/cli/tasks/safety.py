"""``--task safety``: Ships / Sahara safety-head scores (Zhou et al. 2024) on harmful queries.

    headscope score --task safety [--prompts FILE --column goal] [--method ships|sahara] [--out safety.csv]

Without ``--prompts`` it uses the refusal organism's shipped held-out forbidden prompts (synthetic,
harmless topics). ``eval --task safety`` prints the compliance rate on the prompts (keyword
refusal check for real models; the organism's fixed phrase for the organism).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from headscope.analyzers import safety
from headscope.analyzers.safety import _read_state
from headscope.cli import types
from headscope.cli.registry import register_task
from headscope.errors import HeadscopeError
from headscope.heads import EXAMPLES
from headscope.tasks import refusal
from headscope.tasks.refusal import organism_folder, organism_sets
from headscope.tasks.safety_prompts import load_prompts
from headscope.validate import positive_int

METHODS = ("ships", "sahara", "generalized-ships")


@register_task("safety", default_model="refusal")
def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--prompts", help="harmful queries: CSV, JSONL or one per line (default: the organism's held-out set)")
    parser.add_argument("--column", help="CSV column / JSON field with the query (AdvBench: goal, JailbreakBench: Goal)")
    parser.add_argument("--limit", type=positive_int, help="use only the first N queries")
    parser.add_argument("--template", default="reference",
                        help="'reference' ('## Query: {q}\\n## Answer:'), 'chat' (the model's chat template) or a string with {q}")
    if command == "score":
        parser.add_argument("--method", choices=METHODS, default="ships")
        parser.add_argument("--eps", type=float, default=1e-4, help="ablation scale (paper: 1e-4 or 1e-5)")
        parser.add_argument("--ships-ablation", choices=("query", "output"), default="query",
                            help="scale the head's query (uniform attention) or its output z")
        parser.add_argument("--top-per-query", type=int, default=10, help="ships: top heads kept per query")
        parser.add_argument("--max-heads", type=positive_int, default=3, help="sahara: stop at this many heads [3]")
        parser.add_argument("--heads", metavar="NAMES", type=_heads, help="score only these heads (ships, generalized-ships) or "
                            f"choose among them (sahara): {EXAMPLES}")
        parser.add_argument("--min-score", type=float, help="sahara: stop once the subspace shift reaches this (degrees)")
        parser.add_argument("--rank", type=int, default=1, help="sahara / generalized-ships: subspace rank r")
        parser.add_argument("--state", help="sahara: resumable state file (JSON), rewritten after each step")


def queries(args) -> list[str]:
    if args.prompts:
        return load_prompts(args.prompts, args.column, args.limit)

    if organism_folder(args.model) is None:
        raise HeadscopeError(
            f"model {args.model!r} ships no prompts; pass --prompts FILE (e.g. AdvBench's harmful_behaviors.csv "
            "with --column goal)"
        )

    forbidden, _ = organism_sets(args.model)
    qs = [f.query for f in forbidden]
    return qs[: args.limit] if args.limit else qs


def check(args) -> None:
    if args.prompts:
        load_prompts(args.prompts, args.column, args.limit)
    if getattr(args, "state", None) and Path(args.state).exists():
        _read_state(Path(args.state))


def _heads(text: str):
    """--heads NAMES (the heads to score), parsed once; a bare count is the old spelling of --max-heads."""
    if text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"--heads names the heads to score ({EXAMPLES}); to stop Sahara after "
                                         f"{text.strip()} heads use --max-heads {text.strip()}")
    return types.heads(text)


def can_shard(args) -> bool:
    return args.method in ("ships", "generalized-ships")  # Sahara's greedy search is one sequence


def score(args, hm):
    qs = queries(args)
    heads = hm.check_heads(args.heads) if args.heads else None
    common = dict(eps=args.eps, ablation=args.ships_ablation, template=args.template,
                  batch_size=args.batch_size, progress=not args.quiet)
    shard = getattr(args, "shard", None)
    if args.method == "ships":
        return safety.ships(hm, qs, top_per_query=args.top_per_query, heads=heads, shard=shard, **common)
    if args.method == "generalized-ships":
        return safety.generalized_ships(hm, qs, heads=heads, r=args.rank, shard=shard, **common)
    return safety.sahara(hm, qs, max_heads=args.max_heads, min_score=args.min_score, r=args.rank,
                         candidates=heads, state=args.state, **common)


def evaluate(args, hm) -> dict[str, float]:
    info = refusal.organism_info(args.model)
    phrases = (info["refusal"],) if info.get("refusal") else refusal.REFUSAL_KEYWORDS
    m = refusal.refusal_metrics(hm, queries(args), template=args.template, phrases=phrases,
                                max_new_tokens=32, batch_size=args.batch_size)
    return {"compliance": m["compliance"]}
