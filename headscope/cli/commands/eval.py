"""``headscope eval --task NAME``: the task metric, optionally under edits (--ablate, --scale, --vhr,
--var, --inject, --kv-compress, --edits: every edit kind's flags, headscope.cli.edit_flags), under DeCoRe decoding
(--decore, a method that owns the decoding loop), or with random heads (--random K, --random-heads).
The metric is the last line printed (``accuracy: 0.93``)."""

from __future__ import annotations

import argparse
import contextlib
import random
from pathlib import Path

from headscope.cli import edit_flags
from headscope.cli.common import check_edit_heads, edit_heads, edit_mode, load_model
from headscope.errors import HeadscopeError
from headscope.heads import format_heads, parse_heads
from headscope.scores import check_ranking
from headscope.interventions import intervene
from headscope.interventions.kinds.kv_compress import mean_interval
from headscope.scores import HeadScores
from headscope.validate import positive_int

NAME = "eval"
HELP = "the task metric, optionally with heads ablated"
TASK = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    edit_flags.add_arguments(parser)
    parser.add_argument("--random", type=int, metavar="K", help="ablate K random heads instead")
    parser.add_argument("--exclude", metavar="CSV|HEADS",
                        help="with --random: never draw this ranking's --top heads, or these heads (L1H5,L1H4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--draws", type=positive_int, default=1, help="with --random: average over this many draws")
    parser.add_argument("--decore", metavar="CSV", nargs="?", const="",
                        help="decode with DeCoRe, contrasting the model with this ranking's top heads (or the "
                             "--heads named) masked (Gema et al. 2024)")
    parser.add_argument("--decore-alpha", type=float, default=None,
                        help="with --decore: a fixed contrast weight (default: the base entropy, per step)")
    parser.add_argument("--random-edit", choices=modes()[:-1], default="ablate",
                        help="with --random K: what to do with the random heads")


def modes() -> list[str]:
    """The flags that choose heads: every edit kind's heads flag, DeCoRe, and --random."""
    return [flag.name for _, flag in edit_flags.heads_flags()] + ["decore", "random"]


def edit_context(hm, task, args, heads, how: str):
    """The context that applies ``how`` (a heads flag, or decore) to ``heads`` around task.evaluate."""
    args.decore_heads = None
    if how == "decore":
        if not task.supports_decore:
            raise HeadscopeError(f"task {args.task!r} does not support DeCoRe decoding; try --task context-conflict")
        args.decore_heads = heads
        return contextlib.nullcontext()
    return intervene(hm, edit_flags.heads_edits(args, hm, how, heads) if heads else [])


def announce(args, how: str) -> str:
    if how == "decore":
        return "DeCoRe, masking"
    verb, details = edit_flags.describe(args, how)
    return f"{verb} ({', '.join(details)})" if details else verb


def run(args, task) -> int:
    if task.evaluate is None:
        raise HeadscopeError(f"task {args.task!r} has no metric to evaluate")
    mode = edit_mode(args, modes())
    if args.exclude and args.random is None:
        raise HeadscopeError("--exclude only applies with --random K")
    check_edit_heads(args, mode)
    if args.exclude:
        _excluded(args)
    hm = load_model(args)
    how = args.random_edit if mode == "random" else mode

    def metrics(heads, rng=None) -> dict[str, float]:
        with edit_context(hm, task, args, heads, how), intervene(hm, edit_flags.build_edits(args, hm, rng)):
            return task.evaluate(args, hm)

    if edit_flags.is_random(args):
        if mode != "none":
            raise HeadscopeError("--random-heads is its own control; do not combine it with --ablate/--scale/--decore/--random")
        rng = random.Random(args.seed)
        draws = []
        for draw in range(args.draws):
            draws.append(metrics([], rng))
            print(f"draw {draw}: " + ", ".join(f"{k} {v:.3f}" for k, v in draws[-1].items()))
        result = {k: sum(d[k] for d in draws) / len(draws) for k in draws[0]}
        spread = {k: (sum((d[k] - result[k]) ** 2 for d in draws) / max(len(draws) - 1, 1)) ** 0.5 for k in result}
        print(f"std over {len(draws)} draws: " + ", ".join(f"{k} {v:.3f}" for k, v in spread.items()))
        for k in result:
            _, lo, hi = mean_interval([d[k] for d in draws], seed=args.seed)
            print(f"{k}: mean {result[k]:.3f}, 95 % bootstrap interval [{lo:.3f}, {hi:.3f}] over {len(draws)} draws")
    elif mode not in ("none", "random"):
        heads, chosen = edit_heads(args, hm, mode)
        print(f"{announce(args, mode)} {chosen}: {format_heads(heads)}")
        result = metrics(heads)
    elif args.random is not None:
        excluded = set(_excluded(args, hm)) if args.exclude else set()
        pool = [h for h in hm.all_heads() if h not in excluded]
        if not 0 < args.random <= len(pool):
            raise HeadscopeError(f"--random must be between 1 and {len(pool)} (heads available); got {args.random}")
        rng = random.Random(args.seed)
        draws = []
        for draw in range(args.draws):
            heads = sorted(rng.sample(pool, args.random))
            draws.append(metrics(heads))
            print(f"draw {draw}: {announce(args, how)} {format_heads(heads)}: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in draws[-1].items()))
        result = {k: sum(d[k] for d in draws) / len(draws) for k in draws[0]}
    else:
        result = metrics([])
    for line in edit_flags.report(args):  # e.g. --kv-compress: the cache's bytes, before the metric
        print(line)
    for name, value in result.items():
        print(f"{name}: {value:.3f}")
    return 0


def _excluded(args, hm=None) -> list:
    """--exclude: heads by name, or a ranking CSV's top --top (default: --random) heads, read on
    ``hm``'s grid; without ``hm`` (before the model loads) the names or the CSV are only checked."""
    if not (Path(args.exclude).exists() or args.exclude.lower().endswith(".csv")):
        return parse_heads(args.exclude)
    top = args.top if args.top is not None else args.random
    if hm is None:
        check_ranking(args.exclude, top)
        return []
    grid = (hm.geometry.n_layers, hm.geometry.n_heads)
    return HeadScores.from_csv(args.exclude, grid=grid).top(top)
