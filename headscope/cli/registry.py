"""The ``--task`` registry of ``headscope score | eval``.

A task module registers with the :func:`register_task` decorator on its ``add_arguments``::

    @register_task("needle", default_model="retrieval")
    def add_arguments(parser, command): ...     # its own options; command is "score" or "eval"

and may define ``check(args)`` (read and validate its input files before the model loads),
``score(args, hm) -> HeadScores`` (or a shard's Part, given ``args.shard``; then ``can_shard(args) ->
bool`` says beforehand whether these options run sharded) and ``evaluate(args, hm)
-> dict[str, float]`` (the metric(s), the last printed last; runs inside whatever intervention the
eval flags set up). An analyzer registered with a ``default_model``
(:mod:`headscope.analyzers.registry`) is a task too: ``score --task NAME`` with a flag per option.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from typing import Any, Callable

from headscope.analyzers import registry as analyzers
from headscope.errors import HeadscopeError
from headscope.validate import finite_float


@dataclass(frozen=True)
class Task:
    """A ``--task``: a task module, or an analyzer's score function behind generated flags."""

    name: str
    default_model: str
    module: Any = None
    analyzer: analyzers.Analyzer | None = None
    supports_decore: bool = False

    def add_arguments(self, parser: argparse.ArgumentParser, command: str) -> None:
        if self.module is not None:
            self.module.add_arguments(parser, command)
            return
        if command != "score":  # an analyzer scores heads; it has no metric to evaluate
            return
        for f in self.analyzer.cli_options():
            add_option(parser, "--" + f.name.replace("_", "-"), f, self.name)

    def check(self, args) -> None:
        if self.module is not None:
            if hasattr(self.module, "check"):
                self.module.check(args)
            return
        options(self.analyzer, args)

    def can_shard(self, args) -> bool:
        """Whether ``score --shard I/N`` runs this task (with these options) sharded, known before the model
        loads: a task module's ``can_shard(args)``; an analyzer task's score function is told the shard
        and may return a part (checked after its run)."""
        if self.module is not None:
            return bool(getattr(self.module, "can_shard", lambda args: False)(args))
        return True

    @property
    def score(self) -> Callable | None:
        if self.module is not None:
            return getattr(self.module, "score", None)
        return lambda args, hm: self.analyzer.score(hm, options(self.analyzer, args), shard=args.shard,
                                                    progress=not args.quiet)

    @property
    def evaluate(self) -> Callable | None:
        return getattr(self.module, "evaluate", None)


def options(analyzer: analyzers.Analyzer, args):
    """The analyzer's options dataclass from the parsed flags (its ranges checked here)."""
    return analyzer.make_options({f.name: getattr(args, f.name) for f in analyzer.cli_options()})


def add_option(parser: argparse.ArgumentParser, flag: str, f: dataclasses.Field, owner: str) -> None:
    """A flag for one options-dataclass field: the field's default, type from the default, its help."""
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    help_text = f"{f.metadata['help']} [{default}]"
    if isinstance(default, bool):
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        return
    kind = {float: finite_float, int: int}.get(f.metadata.get("type", type(default)), str)  # "type": when None
    parser.add_argument(flag, type=kind, default=default, choices=f.metadata.get("choices"),
                        help=f"{owner}: {help_text}")


_TASKS: dict[str, Task] = {}


def register_task(*names: str, default_model: str, supports_decore: bool = False):
    """Decorator on a task module's ``add_arguments``: registers the module as ``--task NAME``."""
    def decorate(add_arguments):
        module = sys.modules[add_arguments.__module__]
        for name in names:
            if name in _TASKS and _TASKS[name].module is not module:
                raise HeadscopeError(f"--task {name} is registered twice; give the new one another name")
            _TASKS[name] = Task(name, default_model, module, supports_decore=supports_decore)
        return add_arguments

    return decorate


def tasks() -> dict[str, Task]:
    """Every --task: the registered task modules, then the analyzers that name a default model."""
    found = dict(_TASKS)
    for name, analyzer in analyzers.analyzers().items():
        if analyzer.default_model is not None and name not in found:
            found[name] = Task(name, analyzer.default_model, analyzer=analyzer)
    return found
