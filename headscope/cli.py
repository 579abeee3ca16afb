"""Command line: ``headscope score | eval | models`` (+ the commands in ``headscope.commands``).

Errors print ``error: ...`` and exit with status 2, never a traceback. ``eval`` prints the task
metric as its last line (``accuracy: 0.93``) so scripts can read it.
"""

from __future__ import annotations

import argparse
import importlib
import random
import sys

from headscope.commands import COMMAND_MODULES, TASK_MODULES
from headscope.errors import HeadscopeError


def _tasks() -> dict:
    tasks = {}
    for name in TASK_MODULES:
        module = importlib.import_module(name)
        for task in module.TASKS:
            tasks[task] = module
    return tasks


def _common(parser: argparse.ArgumentParser, tasks: dict, command: str, chosen) -> None:
    parser.add_argument("--task", required=True, choices=sorted(tasks), help="what to measure")
    parser.add_argument("--model", default=None, help="shipped organism, local folder or hub id (default: the task's organism)")
    parser.add_argument("--device", default=None, help="torch device, e.g. cuda (default: cpu)")
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 | auto")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    if chosen is not None:
        chosen.add_arguments(parser, command)


def build_parser(task: str | None = None) -> argparse.ArgumentParser:
    """The parser; ``task`` (from a first look at argv) adds that task's own options."""
    tasks = _tasks()
    chosen = tasks.get(task)
    parser = argparse.ArgumentParser(prog="headscope", description="Score, rank and edit attention heads.")
    sub = parser.add_subparsers(dest="command", required=True)

    score = sub.add_parser("score", help="score every head for a task; print and export the ranking")
    _common(score, tasks, "score", chosen)
    score.add_argument("--out", help="write the ranking CSV here (plus a .json metadata sidecar)")
    score.add_argument("--show", type=int, default=10, help="how many top heads to print")

    ev = sub.add_parser("eval", help="the task metric, optionally with heads ablated")
    _common(ev, tasks, "eval", chosen)
    ev.add_argument("--ablate", metavar="CSV", help="ranking CSV whose top heads to ablate")
    ev.add_argument("--top", type=int, help="how many of the ranking's top heads")
    ev.add_argument("--random", type=int, metavar="K", help="ablate K random heads instead")
    ev.add_argument("--exclude", metavar="CSV", help="with --random: never draw this ranking's top heads")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--draws", type=int, default=1, help="with --random: average over this many draws")
    ev.add_argument("--ablation", choices=("zero", "uniform"), default="zero",
                    help="zero the head output, or give it uniform attention")

    sub.add_parser("models", help="list the shipped model organisms")
    for name in COMMAND_MODULES:
        module = importlib.import_module(name)
        module.add_arguments(sub.add_parser(module.NAME, help=module.HELP))
    return parser


def _peek_task(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--task" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--task="):
            return arg.split("=", 1)[1]
    return None


def load_model(args):
    """The model named by --model (or the task's default organism) as a HeadModel."""
    from headscope.model import HeadModel

    if getattr(args, "batch_size", 1) < 1:
        raise HeadscopeError(f"--batch-size must be >= 1; got {args.batch_size}")
    return HeadModel.load(args.model, device=args.device, dtype=args.dtype)


def _score(args, task) -> int:
    if not hasattr(task, "score"):
        raise HeadscopeError(f"task {args.task!r} has no head scores; try `headscope eval --task {args.task}`")
    hm = load_model(args)
    scores = task.score(args, hm)
    frame = scores.to_frame()
    details = ", ".join(f"{k}={v}" for k, v in scores.params.items())
    print(f"{hm}\n{scores.method} scores ({details})")
    print(frame.head(args.show).to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    if args.out:
        scores.to_csv(args.out)
        print(f"wrote {args.out} ({len(frame)} heads)")
    return 0


def _eval(args, task) -> int:
    from headscope.scores import HeadScores

    if not hasattr(task, "evaluate"):
        raise HeadscopeError(f"task {args.task!r} has no metric to evaluate")
    if args.ablate and args.random is not None:
        raise HeadscopeError("use either --ablate CSV --top K or --random K, not both")
    if args.ablate and args.top is None:
        raise HeadscopeError("--ablate CSV needs --top K (how many of its top heads to ablate)")
    if args.exclude and args.random is None:
        raise HeadscopeError("--exclude only applies with --random K")
    hm = load_model(args)

    def metrics(heads) -> dict[str, float]:
        with hm.ablate(heads, mode=args.ablation):
            return task.evaluate(args, hm)

    if args.ablate:
        heads = hm.check_heads(HeadScores.from_csv(args.ablate).top(args.top))
        print(f"ablating ({args.ablation}) the top {args.top} heads of {args.ablate}: {heads}")
        result = metrics(heads)
    elif args.random is not None:
        excluded = set()
        if args.exclude:
            excluded = set(HeadScores.from_csv(args.exclude).top(args.top if args.top is not None else args.random))
        pool = [h for h in hm.all_heads() if h not in excluded]
        if not 0 < args.random <= len(pool):
            raise HeadscopeError(f"--random must be between 1 and {len(pool)} (heads available); got {args.random}")
        rng = random.Random(args.seed)
        draws = []
        for draw in range(args.draws):
            heads = sorted(rng.sample(pool, args.random))
            draws.append(metrics(heads))
            print(f"draw {draw}: ablating ({args.ablation}) {heads}: " + ", ".join(f"{k} {v:.3f}" for k, v in draws[-1].items()))
        result = {k: sum(d[k] for d in draws) / len(draws) for k in draws[0]}
    else:
        result = metrics([])
    for name, value in result.items():
        print(f"{name}: {value:.3f}")
    return 0


def _models(args) -> int:
    from headscope import zoo

    for name, description in zoo.ORGANISMS.items():
        info = zoo.organism_info(name)
        print(f"{name}\t{info.get('description', description)}\t{zoo.organism_path(name)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_peek_task(argv)).parse_args(argv)
    try:
        if args.command in ("score", "eval"):
            task = _tasks()[args.task]
            if args.model is None:
                args.model = task.DEFAULT_MODEL
            return (_score if args.command == "score" else _eval)(args, task)
        if args.command == "models":
            return _models(args)
        for name in COMMAND_MODULES:
            module = importlib.import_module(name)
            if module.NAME == args.command:
                return module.run(args)
        raise HeadscopeError(f"unknown command {args.command!r}")
    except HeadscopeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
