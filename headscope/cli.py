"""Command line: ``headscope score | eval | models`` (+ the commands in ``headscope.commands``).

Errors print ``error: ...`` and exit with status 2, never a traceback. ``eval`` prints the task
metric as its last line (``accuracy: 0.93``) so scripts can read it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from headscope.commands import COMMAND_MODULES, TASK_MODULES, edit_flags
from headscope.controls import MIN_DRAWS, random_control
from headscope.errors import HeadscopeError
from headscope.heads import EXAMPLES, check_ranking, check_selection, format_head, format_heads, parse_heads, select_heads
from headscope.validate import check_output, finite_float, nonnegative_int, positive_int


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors end as one ``error:`` line like every other bad input."""

    def error(self, message):
        raise HeadscopeError(f"{message} (see `{self.prog} --help`)")


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
    add_device_arguments(parser)
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 | auto")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    if chosen is not None:
        chosen.add_arguments(parser, command)


def build_parser(task: str | None = None) -> argparse.ArgumentParser:
    """The parser; ``task`` (from a first look at argv) adds that task's own options."""
    tasks = _tasks()
    chosen = tasks.get(task)
    parser = _Parser(prog="headscope", description="Score, rank and edit attention heads.")
    sub = parser.add_subparsers(dest="command", required=True)

    score = sub.add_parser("score", help="score every head for a task; print and export the ranking")
    _common(score, tasks, "score", chosen)
    score.add_argument("--out", help="write the ranking CSV here (plus a .json metadata sidecar)")
    score.add_argument("--show", type=nonnegative_int, default=10, help="how many top heads to print")
    score.add_argument("--shard", metavar="I/N", help="run part I (0-based) of N of a long sweep and write it to --out "
                       "(Ships, generalized Ships, activation / path patching, needle); join with `headscope merge`")

    ev = sub.add_parser("eval", help="the task metric, optionally with heads ablated")
    _common(ev, tasks, "eval", chosen)
    ev.add_argument("--ablate", metavar="CSV", nargs="?", const="",
                    help="ablate this ranking's --top K heads (or, without CSV, the --heads named)")
    add_heads_arguments(ev)
    ev.add_argument("--random", type=int, metavar="K", help="ablate K random heads instead")
    ev.add_argument("--exclude", metavar="CSV|HEADS",
                    help="with --random: never draw this ranking's --top heads, or these heads (L1H5,L1H4)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--draws", type=positive_int, default=MIN_DRAWS,
                    help=f"with --random / --random-heads: draws of the control [{MIN_DRAWS}]; mean and 95%% bootstrap interval")
    ev.add_argument("--ablation", choices=("zero", "uniform"), default="zero",
                    help="zero the head output, or give it uniform attention")
    add_edit_arguments(ev)
    edit_flags.add_arguments(ev)

    sub.add_parser("models", help="list the shipped model organisms")
    for name in COMMAND_MODULES:
        module = importlib.import_module(name)
        module.add_arguments(sub.add_parser(module.NAME, help=module.HELP))
    _finite_floats(parser)
    return parser


def _finite_floats(parser: argparse.ArgumentParser) -> None:
    """Every float option of every command refuses nan and inf (they make results meaningless)."""
    for action in parser._actions:
        if action.type is float:
            action.type = finite_float
        for child in (action.choices or {}).values() if isinstance(action, argparse._SubParsersAction) else ():
            _finite_floats(child)


def check_outputs(args) -> None:
    """Output paths checked before any model is loaded: ranking CSVs (``score --out``, ``--scores``)
    with their sidecars, and every other file written (``--out``, ``--plot``, ``--state``)."""
    from headscope.scores import check_ranking_path

    for name in ("out", "scores", "plot", "state"):
        path = getattr(args, name, None)
        if not path:
            continue
        if name == "scores" or (name == "out" and args.command == "score"):
            check_ranking_path(path)
        else:
            check_output(path, f"--{name} file")


def _peek_task(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--task" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--task="):
            return arg.split("=", 1)[1]
    return None


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """--device, or --device-map / --max-memory to split the model over devices (accelerate)."""
    parser.add_argument("--device", default=None, help="torch device, e.g. cuda (default: cpu)")
    parser.add_argument("--device-map", default=None,
                        help="split the model over devices: auto | balanced | sequential | JSON {\"module\": device}")
    parser.add_argument("--max-memory", default=None, help="with --device-map: per-device budget, e.g. 0=20GiB,1=20GiB,cpu=64GiB")


def load_model(args):
    """The model named by --model (or the task's default organism) as a HeadModel."""
    from headscope import devices
    from headscope.model import HeadModel

    return HeadModel.load(args.model, device=args.device, dtype=args.dtype,
                          device_map=devices.parse_device_map(getattr(args, "device_map", None)),
                          max_memory=devices.parse_max_memory(getattr(args, "max_memory", None)))


def _score(args, task) -> int:
    if not hasattr(task, "score"):
        raise HeadscopeError(f"task {args.task!r} has no head scores; try `headscope eval --task {args.task}`")
    from headscope import sharding

    args.shard = sharding.Shard.parse(args.shard)
    if args.shard is not None and not args.out:
        raise HeadscopeError("--shard I/N writes its part to --out PATH; give one path per shard")
    hm = load_model(args)
    scores = task.score(args, hm)
    if args.shard is not None:
        if getattr(scores, "shard", None) is None:
            raise HeadscopeError(f"{scores.method} does not run sharded; --shard applies to Ships, generalized Ships, "
                                 "activation / path patching and the needle task")
        sharding.write_part(scores, args.out)
        print(f"wrote part {args.shard} of {scores.method} to {args.out}; join all parts with `headscope merge`")
        return 0
    frame = scores.to_frame()
    details = ", ".join(f"{k}={v}" for k, v in scores.params.items())
    print(f"{hm}\n{scores.method} scores ({details})")
    shown = frame.dropna(subset=["score"]).head(args.show)  # unscored heads (NaN) are not ranked
    shown = shown.assign(head=[format_head(h) for h in zip(shown["layer"], shown["head"])]).drop(columns="layer")
    print(shown.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    if args.out:
        scores.to_csv(args.out)
        print(f"wrote {args.out} ({len(frame)} heads)")
    return 0


def add_heads_arguments(parser: argparse.ArgumentParser) -> None:
    """--top K (of a ranking CSV) and --heads NAMES: the two ways to say which heads to edit."""
    parser.add_argument("--top", type=positive_int, help="how many of the ranking's top heads")
    parser.add_argument("--heads", metavar="NAMES",
                        help=f"the heads to edit, by name instead of a ranking CSV: {EXAMPLES}")


def add_edit_arguments(parser: argparse.ArgumentParser) -> None:
    """--scale / --decore (issue 4): reweight the ranking's top heads, or decode with DeCoRe."""
    parser.add_argument("--scale", metavar="CSV", nargs="?", const="",
                        help="multiply the output of this ranking's top heads (or the --heads named) by --alpha")
    parser.add_argument("--alpha", type=float, default=2.0, help="with --scale: the factor (negative allowed)")
    parser.add_argument("--decore", metavar="CSV", nargs="?", const="",
                        help="decode with DeCoRe, contrasting the model with this ranking's top heads (or the "
                             "--heads named) masked (Gema et al. 2024)")
    parser.add_argument("--decore-alpha", type=float, default=None,
                        help="with --decore: a fixed contrast weight (default: the base entropy, per step)")
    parser.add_argument("--random-edit", choices=("ablate", "scale", "decore"), default="ablate",
                        help="with --random K: what to do with the random heads")


def edit_mode(args) -> str:
    """Which of --ablate / --scale / --decore (/ --random, where the command has it) was asked for: one at most."""
    options = ["ablate", "scale", "decore"] + (["random"] if hasattr(args, "random") else [])
    chosen = [f for f in options if getattr(args, f, None) is not None]
    if len(chosen) > 1:
        raise HeadscopeError(f"use only one of {', '.join('--' + o for o in options)}; "
                             f"got {', '.join('--' + c for c in chosen)}")
    mode = chosen[0] if chosen else "none"
    if mode in ("none", "random") and args.heads:
        raise HeadscopeError("--heads names the heads to edit: say what to do with them, e.g. --ablate --heads "
                             + args.heads + " (or --scale / --decore)")
    return mode


def check_edit_heads(args, mode: str) -> None:
    """``--MODE CSV --top K`` or ``--MODE --heads NAMES`` checked before the model loads."""
    if mode in ("ablate", "scale", "decore"):
        check_selection(names=args.heads, ranking=getattr(args, mode) or None, top=args.top, option="--" + mode)


def edit_heads(args, hm, mode: str):
    """The heads ``--MODE CSV --top K`` or ``--MODE --heads NAMES`` names, checked against the model
    (a ranking CSV is read on the model's grid)."""
    grid = (hm.geometry.n_layers, hm.geometry.n_heads)
    heads, how = select_heads(names=args.heads, ranking=getattr(args, mode) or None, top=args.top,
                              option="--" + mode, grid=grid)
    return hm.check_heads(heads), how


def edit_context(hm, task, args, heads, how: str):
    """The context that applies ``how`` (ablate / scale / decore) to ``heads`` around task.evaluate."""
    import contextlib

    from headscope.interventions import Edit, intervene

    args.decore_heads = None
    if how == "scale":
        return intervene(hm, Edit("scale", heads, strength=args.alpha))
    if how == "decore":
        if not getattr(task, "SUPPORTS_DECORE", False):
            raise HeadscopeError(f"task {args.task!r} does not support DeCoRe decoding; try --task context-conflict")
        args.decore_heads = heads
        return contextlib.nullcontext()
    return hm.ablate(heads, mode=args.ablation)


def _eval(args, task) -> int:
    from headscope.interventions import intervene

    if not hasattr(task, "evaluate"):
        raise HeadscopeError(f"task {args.task!r} has no metric to evaluate")
    mode = edit_mode(args)
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
        control = random_control(lambda rng: metrics([], rng), args.draws, args.seed, _print_draw)
        result = _print_control(control)
    elif mode in ("ablate", "scale", "decore"):
        heads, chosen = edit_heads(args, hm, mode)
        detail = {"ablate": f"ablating ({args.ablation})", "scale": f"scaling by {args.alpha:g}",
                  "decore": "DeCoRe, masking"}[mode]
        print(f"{detail} {chosen}: {format_heads(heads)}")
        result = metrics(heads)
    elif args.random is not None:
        excluded = set()
        if args.exclude:
            excluded = set(_excluded(args, hm))
        pool = [h for h in hm.all_heads() if h not in excluded]
        if not 0 < args.random <= len(pool):
            raise HeadscopeError(f"--random must be between 1 and {len(pool)} (heads available); got {args.random}")
        what = f"ablating ({args.ablation})" if how == "ablate" else {"scale": "scaling", "decore": "DeCoRe, masking"}[how]

        def draw(rng) -> dict[str, float]:
            heads = sorted(rng.sample(pool, args.random))
            print(f"{what} {format_heads(heads)}")
            return metrics(heads)

        result = _print_control(random_control(draw, args.draws, args.seed, _print_draw))
    else:
        result = metrics([])
    for name, value in result.items():
        print(f"{name}: {value:.3f}")
    return 0


def _print_draw(i: int, result: dict) -> None:
    print(f"draw {i}: " + ", ".join(f"{k} {v:.3f}" for k, v in result.items()))


def _print_control(control) -> dict[str, float]:
    """Print a random control's mean and 95 % bootstrap interval per metric; return the means."""
    note = "" if control.n >= MIN_DRAWS else f" (fewer than {MIN_DRAWS} draws: no claim against chance)"
    print(f"random control, {control.n} draws (seed {control.seed}), mean [95% bootstrap interval]{note}: "
          + ", ".join(f"{k} {control.cell(k)}" for k in control.mean))
    return control.mean


def _excluded(args, hm=None) -> list:
    """--exclude: heads by name, or a ranking CSV's top --top (default: --random) heads, read on
    ``hm``'s grid; without ``hm`` (before the model loads) the names or the CSV are only checked."""
    from pathlib import Path

    from headscope.scores import HeadScores

    if not (Path(args.exclude).exists() or args.exclude.lower().endswith(".csv")):
        return parse_heads(args.exclude)
    top = args.top if args.top is not None else args.random
    if hm is None:
        check_ranking(args.exclude, top)
        return []
    grid = (hm.geometry.n_layers, hm.geometry.n_heads)
    return HeadScores.from_csv(args.exclude, grid=grid).top(top)


def _models(args) -> int:
    from headscope import zoo

    for name, description in zoo.ORGANISMS.items():
        info = zoo.organism_info(name)
        prompt = json.dumps(zoo.EXAMPLE_PROMPTS[name][0]) if name in zoo.EXAMPLE_PROMPTS else ""
        image = f"--image {zoo.organism_path(name) / zoo.EXAMPLE_IMAGES[name]}" if name in zoo.EXAMPLE_IMAGES else ""
        print(f"{name}\t{info.get('description', description)}\t{zoo.organism_path(name)}\t{prompt}\t{image}".rstrip("\t"))
    return 0


def _quiet_transformers() -> None:
    """transformers' own loading bars and warnings are not ours to show on the command line."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _check_utf8(arg: str) -> None:
    try:
        arg.encode("utf-8")
    except UnicodeEncodeError:
        shown = arg.encode("utf-8", "backslashreplace").decode()
        raise HeadscopeError(f"argument {shown!r} is not valid UTF-8; pass UTF-8 text (check the shell's locale)") from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    _quiet_transformers()
    try:
        for arg in argv:
            _check_utf8(arg)
        args = build_parser(_peek_task(argv)).parse_args(argv)
        check_outputs(args)
        edit_flags.check(args)
        if args.command in ("score", "eval"):
            task = _tasks()[args.task]
            if args.model is None:
                args.model = task.DEFAULT_MODEL
            if hasattr(task, "check"):
                task.check(args)
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
    except OSError as exc:  # the file system or device refused (disk full, permission, ...)
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}; check the path, permissions and free space", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
