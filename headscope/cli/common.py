"""What several commands share: the usage-error parser, device flags, model loading, the --task
options every task has, the checks on output paths, and which heads an edit flag names."""

from __future__ import annotations

import argparse

from headscope.hf import devices
from headscope.errors import HeadscopeError
from headscope.heads import format_heads
from headscope.scores import check_selection, select_heads
from headscope.model import HeadModel
from headscope.validate import finite_float, positive_int


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors end as one ``error:`` line like every other bad input."""

    def error(self, message):
        raise HeadscopeError(f"{message} (see `{self.prog} --help`)")


def finite_floats(parser: argparse.ArgumentParser) -> None:
    """Every float option of every command refuses nan and inf (they make results meaningless)."""
    for action in parser._actions:
        if action.type is float:
            action.type = finite_float
        for child in (action.choices or {}).values() if isinstance(action, argparse._SubParsersAction) else ():
            finite_floats(child)


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """--device, or --device-map / --max-memory to split the model over devices (accelerate)."""
    parser.add_argument("--device", default=None, help="torch device, e.g. cuda (default: cpu)")
    parser.add_argument("--device-map", default=None,
                        help="split the model over devices: auto | balanced | sequential | JSON {\"module\": device}")
    parser.add_argument("--max-memory", default=None, help="with --device-map: per-device budget, e.g. 0=20GiB,1=20GiB,cpu=64GiB")


def add_task_arguments(parser: argparse.ArgumentParser, tasks: dict, command: str, chosen) -> None:
    """The options every ``--task`` command has, plus the chosen task's own."""
    parser.add_argument("--task", required=True, choices=sorted(tasks), help="what to measure")
    parser.add_argument("--model", default=None, help="shipped organism, local folder or hub id (default: the task's organism)")
    add_device_arguments(parser)
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 | auto")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    if chosen is not None:
        chosen.add_arguments(parser, command)


def load_model(args) -> HeadModel:
    """The model named by --model (or the task's default organism) as a HeadModel."""
    device_map = devices.parse_device_map(getattr(args, "device_map", None))
    max_memory = devices.parse_max_memory(getattr(args, "max_memory", None))
    devices.check_devices(device_map, max_memory)
    return HeadModel.load(args.model, device=args.device, dtype=args.dtype, device_map=device_map,
                          max_memory=max_memory)


def edit_mode(args, modes: list[str]) -> str:
    """Which of the head-choosing flags ``modes`` (--ablate, --scale, --decore, --random) was asked for:
    one at most ("none" without any)."""
    chosen = [f for f in modes if getattr(args, f, None) is not None]
    if len(chosen) > 1:
        raise HeadscopeError(f"use only one of {', '.join('--' + o for o in modes)}; "
                             f"got {', '.join('--' + c for c in chosen)}")
    mode = chosen[0] if chosen else "none"
    if mode in ("none", "random") and args.heads:
        raise HeadscopeError("--heads names the heads to edit: say what to do with them, e.g. --ablate --heads "
                             + format_heads(args.heads) + " (or --scale / --decore)")
    if getattr(args, "decore_alpha", None) is not None and mode != "decore":
        raise HeadscopeError("--decore-alpha applies to --decore; without it it would be ignored")
    return mode


def check_edit_heads(args, mode: str) -> None:
    """``--MODE CSV --top K`` or ``--MODE --heads NAMES`` checked before the model loads (--heads
    arrives parsed: headscope.cli.types.heads)."""
    if mode in ("none", "random"):
        return
    ranking = getattr(args, mode) or None
    if args.heads:
        if ranking:
            raise HeadscopeError(f"give --{mode} CSV --top K or --heads NAMES, not both")
        if args.top is not None:
            raise HeadscopeError("--top K picks from a ranking CSV; --heads already names the heads")
        return
    check_selection(names=None, ranking=ranking, top=args.top, option="--" + mode)


def edit_heads(args, hm, mode: str):
    """The heads ``--MODE --heads NAMES`` or ``--MODE CSV --top K`` names, checked against the model
    (a ranking CSV is read on the model's grid, and must be made for this model unless --force)."""
    if args.heads:
        return hm.check_heads(args.heads), "heads"
    grid = (hm.geometry.n_layers, hm.geometry.n_heads)
    heads, how = select_heads(ranking=getattr(args, mode) or None, top=args.top, option="--" + mode, grid=grid,
                              model=hm, force=getattr(args, "force", False))
    return hm.check_heads(heads), how
