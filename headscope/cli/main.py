"""Command line: ``headscope COMMAND`` (the commands in ``headscope.cli.commands``).

Errors print ``error: ...`` and exit with status 2, never a traceback. ``eval`` prints the task
metric as its last line (``accuracy: 0.93``) so scripts can read it.
"""

from __future__ import annotations

import argparse
import sys

from transformers.utils import logging as hf_logging

from headscope.cli import boundary, edit_flags, paths, tasks as _builtin_tasks  # noqa: F401  registers the --task modules
from headscope.cli.commands import COMMANDS
from headscope.cli.common import Parser, add_task_arguments, finite_floats
from headscope.cli.registry import tasks as registered_tasks
from headscope.errors import HeadscopeError


def build_parser(task: str | None = None) -> argparse.ArgumentParser:
    """The parser; ``task`` (from a first look at argv) adds that task's own options."""
    tasks = registered_tasks()
    chosen = tasks.get(task)
    parser = Parser(prog="headscope", description="Score, rank and edit attention heads.")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        child = sub.add_parser(module.NAME, help=module.HELP)
        if getattr(module, "TASK", False):
            add_task_arguments(child, tasks, module.NAME, chosen)
        module.add_arguments(child)
    finite_floats(parser)
    return parser


def _peek_task(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--task" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--task="):
            return arg.split("=", 1)[1]
    return None


def _quiet_transformers() -> None:
    """transformers' own loading bars and warnings are not ours to show on the command line."""
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
        paths.check(args)
        edit_flags.check(args)
        boundary.check(args)
        module = next(m for m in COMMANDS if m.NAME == args.command)
        if getattr(module, "TASK", False):
            task = registered_tasks()[args.task]
            if args.model is None:
                args.model = task.default_model
            task.check(args)
            return module.run(args, task)
        return module.run(args)
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
