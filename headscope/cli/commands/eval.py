"""``headscope eval --task NAME``: the task metric, optionally under edits (--ablate, --scale, --vhr,
--var, --inject, --kv-compress, --edits: every edit kind's flags, headscope.cli.edit_flags), under DeCoRe decoding
(--decore, a method that owns the decoding loop), or with random heads (--random K, --random-heads).
The metric is the last line printed (``accuracy: 0.93``)."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from headscope.cli import edit_flags
from headscope.cli.common import check_edit_heads, edit_heads, edit_mode, load_model
from headscope.controls import MIN_DRAWS, random_control
from headscope.errors import HeadscopeError
from headscope.heads import format_heads, parse_heads
from headscope.scores import check_ranking
from headscope.interventions import intervene
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
    parser.add_argument("--draws", type=positive_int, default=MIN_DRAWS,
                        help=f"with --random / --random-heads: draws of the control [{MIN_DRAWS}]; mean and 95%% "
                             "bootstrap interval")
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
        result = _print_control(random_control(lambda rng: metrics([], rng), args.draws, args.seed, _print_draw))
    elif mode not in ("none", "random"):
        heads, chosen = edit_heads(args, hm, mode)
        print(f"{announce(args, mode)} {chosen}: {format_heads(heads)}")
        result = metrics(heads)
    elif args.random is not None:
        excluded = set(_excluded(args, hm)) if args.exclude else set()
        pool = [h for h in hm.all_heads() if h not in excluded]
        if not 0 < args.random <= len(pool):
            raise HeadscopeError(f"--random must be between 1 and {len(pool)} (heads available); got {args.random}")
        what = announce(args, how)

        def draw(rng) -> dict[str, float]:
            heads = sorted(rng.sample(pool, args.random))
            print(f"{what} {format_heads(heads)}")
            return metrics(heads)

        result = _print_control(random_control(draw, args.draws, args.seed, _print_draw))
    else:
        result = metrics([])
    for line in edit_flags.report(args):  # e.g. --kv-compress: the cache's bytes, before the metric
        print(line)
    for name, value in result.items():
        print(f"{name}: {value:.3f}")
    return 0


def _print_draw(i: int, result: dict) -> None:
    print(f"draw {i}: " + ", ".join(f"{k} {v:.3f}" for k, v in result.items()))


def _print_control(control) -> dict[str, float]:
    """Print a random control's mean and 95 % bootstrap interval per metric; return the means."""
    note = "" if control.n >= MIN_DRAWS else f" (fewer than {MIN_DRAWS} draws: no claim against chance)"
    print(f"random control, {control.n} draws (seed {control.seed}), mean [95 % bootstrap interval]{note}: "
          + ", ".join(f"{k} {control.cell(k)}" for k in control.mean))
    return control.mean


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
    return HeadScores.from_csv(args.exclude, grid=grid, model=hm, force=args.force).top(top)
