"""Analyzers, each declared once: ``Analyzer`` and the registry ``headscope merge`` and the CLI read.

An analyzer is a name (the ``method`` of the HeadScores it returns), a score function, its
options (a frozen dataclass whose ``__post_init__`` checks ranges; fields with a ``help`` in their
metadata become ``--FIELD`` flags of ``headscope score --task NAME``), and an optional
``join(parts)`` -> HeadScores that ``headscope merge`` calls to replay the unsharded run's final
arithmetic (without one, each head's value comes from the part that owns it).

With a ``default_model`` the analyzer is a command-line task of its own: ``score --task NAME``
loads that model (or --model) and calls ``score(hm, options, shard=None | Shard, progress=bool)``
-> HeadScores, or a :class:`headscope.sharding.Part` given a shard. The built-in analyzers
(retrieval, Ships, generalized Ships, activation / attribution / path patching, classic head types,
sinks, head pursuit, VHD, function vectors) register their Python functions (and joins) without a
default model: their --task modules (headscope.cli.tasks) read the task data and call them.

A new analyzer is one module that calls :func:`register`; third parties list the module in the
entry-point group ``headscope.analyzers``.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from importlib import metadata
from typing import Callable

from headscope.errors import HeadscopeError

ENTRY_POINTS = "headscope.analyzers"
# the modules that register the built-in analyzers
BUILTIN = ("headscope.analyzers.safety", "headscope.analyzers.retrieval", "headscope.analyzers.circuits",
           "headscope.analyzers.classic", "headscope.analyzers.sinks", "headscope.analyzers.pursuit",
           "headscope.analyzers.vision", "headscope.methods.soft_injection")


@dataclass(frozen=True)
class NoOptions:
    """The options of an analyzer that takes none (its parameters are keyword arguments)."""


@dataclass(frozen=True)
class Analyzer:
    name: str
    score: Callable
    options: type = NoOptions
    join: Callable | None = None
    default_model: str | None = None
    doc: str = ""

    def make_options(self, values: dict | None = None):
        """The options dataclass for ``values`` (defaults filled in); ``__post_init__`` checks ranges."""
        values = dict(values or {})
        names = {f.name for f in dataclasses.fields(self.options)}
        unknown = set(values) - names
        if unknown:
            raise HeadscopeError(f"unknown {self.name} option(s) {sorted(unknown)}; choose from {sorted(names)}")
        return self.options(**values)

    def cli_options(self) -> list[dataclasses.Field]:
        """The option fields ``headscope score --task NAME`` exposes as flags."""
        return [f for f in dataclasses.fields(self.options) if "help" in f.metadata]


_ANALYZERS: dict[str, Analyzer] = {}
_loaded = False


def register(analyzer: Analyzer) -> Analyzer:
    """Add an analyzer to the registry (a second one of the same name is an error)."""
    if _ANALYZERS.get(analyzer.name, analyzer) is not analyzer:
        raise HeadscopeError(f"analyzer {analyzer.name!r} is registered twice; give the new one another name")
    if not dataclasses.is_dataclass(analyzer.options) or not analyzer.options.__dataclass_params__.frozen:
        raise HeadscopeError(f"analyzer {analyzer.name!r}: options must be a frozen dataclass")
    _ANALYZERS[analyzer.name] = analyzer
    return analyzer


def unregister(name: str) -> None:
    """Remove an analyzer (tests that register their own)."""
    _ANALYZERS.pop(name, None)


def load(again: bool = False) -> None:
    """The built-in analyzers and those third parties list under the ``headscope.analyzers`` entry
    points, imported once (``again``: look again). Imported here, not at the top: the analyzer
    modules import this registry (to register), so a top-level import of them would be a cycle."""
    global _loaded
    if _loaded and not again:
        return
    _loaded = True
    for name in BUILTIN:
        importlib.import_module(name)
    for entry in metadata.entry_points(group=ENTRY_POINTS):
        entry.load()


def analyzers() -> dict[str, Analyzer]:
    """Every registered analyzer by name."""
    load()
    return dict(_ANALYZERS)


def get(name: str) -> Analyzer | None:
    """The analyzer registered as ``name`` (the ``method`` of its HeadScores), or None."""
    return analyzers().get(name)
