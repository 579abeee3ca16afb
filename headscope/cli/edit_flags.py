"""Edit flags of ``headscope generate`` and ``headscope eval``, generated from the edit-kind registry.

Every kind's ``CliFlag`` (headscope.interventions.registry) becomes a flag, its strength flag (the
kind's default) and one ``--FLAG-OPTION`` per option field with a ``help``; every value is checked
by the kind (its options dataclass, its strength rule) before the model loads. Each flag turns into
:class:`~headscope.interventions.Edit` data and all of them reach the model through one
``intervene(hm, edits)``. A new edit kind with a flag needs no change here, nor in generate or eval::

    --edits FILE          any saved edits (save_edits JSON)
    --ablate / --scale    a ranking's --top K heads or the --heads named (zero / uniform; scale by --alpha)
    --vhr per-input       VHR (He et al. 2025): scale each input's own VHD-selected heads by --alpha [2.0]
                          (--vhr-reselect: re-chosen before every decode step)
    --vhr CSV             ... heads fixed once from a probe set's VHD ranking (a variant)
      --random-heads      ... on random heads, the same count per layer (eval: --draws N --seed S)
    --var                 VAR (Kang et al. 2025): redistribute attention off the sinks (--var-p, --var-rho,
                          --var-tau, --var-rule, ...)
    --inject FILE         soft injection (Park & Rhee 2025): a task embedding from `headscope inject fit`
    --kv-compress RANKING head-wise KV-cache compression (DuoAttention / HeadKV; --full-share, --sink, --recent, ...)
      --random-heads      ... with random full KV heads (eval: --draws N --seed S)
"""

from __future__ import annotations

import argparse
import dataclasses
import random

from headscope.cli import types
from headscope.cli.registry import add_option
from headscope.errors import HeadscopeError
from headscope.heads import EXAMPLES
from headscope.interventions import Edit, load_edits, registry
from headscope.validate import finite_float, positive_int


def flags() -> list[tuple[registry.EditKind, registry.CliFlag]]:
    """(kind, flag) for every command-line flag of every registered kind, in registration order."""
    return [(kind, flag) for kind in registry.kinds().values() for flag in kind.flags]


def heads_flags() -> list[tuple[registry.EditKind, registry.CliFlag]]:
    """The flags that edit the heads --top K / --heads NAMES choose (--ablate, --scale, ...)."""
    return [(kind, flag) for kind, flag in flags() if flag.takes == "heads"]


def _has(parser: argparse.ArgumentParser, option: str) -> bool:
    return any(option in action.option_strings for action in parser._actions)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--edits, every kind's flags with their strength and option flags, and --top / --heads."""
    parser.add_argument("--edits", metavar="JSON", help="apply the edits in this file (written by save_edits)")
    parser.add_argument("--force", action="store_true",
                        help="use rankings and task embeddings made for another model (another weights hash) anyway")
    for kind, flag in flags():
        name = "--" + flag.name
        if flag.takes == "heads":
            parser.add_argument(name, metavar="CSV", nargs="?", const="", help=flag.help)
        elif flag.takes == "file":
            parser.add_argument(name, metavar=flag.metavar or "FILE", help=flag.help)
        else:
            parser.add_argument(name, action="store_true", help=flag.help)
        if flag.strength and not _has(parser, "--" + flag.strength):
            parser.add_argument("--" + flag.strength, type=finite_float, default=kind.default_strength,
                                help=f"with {name}: the {kind.name} edit's strength [{kind.default_strength:g}]")
        for field in kind.cli_options(flag):
            add_option(parser, f"{name}-{field.name.replace('_', '-')}", field, f"with {name}")
        if flag.arguments is not None:
            flag.arguments(parser)
    random_flags = [f"--{flag.name}" for _, flag in flags() if flag.random]
    if random_flags and not _has(parser, "--random-heads"):
        parser.add_argument("--random-heads", action="store_true",
                            help=f"with {' / '.join(random_flags)}: random heads instead, the same count per layer "
                                 "(the control; eval: --draws N --seed S)")
    if heads_flags() and not _has(parser, "--top"):
        add_heads_arguments(parser)


def add_heads_arguments(parser: argparse.ArgumentParser) -> None:
    """--top K (of a ranking CSV) and --heads NAMES: the two ways to say which heads to edit."""
    parser.add_argument("--top", type=positive_int, help="how many of the ranking's top heads")
    parser.add_argument("--heads", metavar="NAMES", type=types.heads,
                        help=f"the heads to edit, by name instead of a ranking CSV: {EXAMPLES}")


def given(args, takes: tuple[str, ...] = ("switch", "file")) -> list[tuple[registry.EditKind, registry.CliFlag]]:
    """The flags of these kinds given on this command line."""
    return [(kind, flag) for kind, flag in flags()
            if flag.takes in takes and getattr(args, flag.dest, None) not in (None, False)]


def probe(kind: registry.EditKind, flag: registry.CliFlag, args) -> None:
    """The kind's checks on the flag's strength and options, run on an edit of head L0H0 (every model
    has it), or of no heads for kinds that choose their own (no model needed)."""
    if kind.source is not None:
        return
    strength = getattr(args, flag.strength.replace("-", "_")) if flag.strength else None
    options = {f.name: getattr(args, f"{flag.dest}_{f.name}") for f in kind.cli_options(flag)}
    Edit(kind.name, [(0, 0)] if kind.needs_heads else [], strength=strength, options=options or None)


def check(args) -> None:
    """Every edit flag's values and input files, validated before the model loads."""
    if getattr(args, "edits", None):
        load_edits(args.edits)
    chosen = given(args, ("switch", "file", "heads"))
    for kind, flag in chosen:
        if flag.probe:
            probe(kind, flag, args)
        if flag.check is not None:
            flag.check(args)
    if getattr(args, "random_heads", False) and not any(flag.random for _, flag in chosen):
        names = " or ".join(f"--{flag.name} {flag.metavar or ''}".strip() for _, flag in flags() if flag.random)
        raise HeadscopeError(f"--random-heads needs {names} (it draws as many heads per layer as they select)")
    for kind, flag in flags():  # an option flag changed from its default without its flag
        if getattr(args, flag.dest, None) in (None, False):
            for f in kind.cli_options(flag):
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                if getattr(args, f"{flag.dest}_{f.name}", default) != default:
                    raise HeadscopeError(f"--{flag.name}-{f.name.replace('_', '-')} needs "
                                         f"{f.metadata.get('needs', '--' + flag.name)}")
    _check_orphans(args)


def _check_orphans(args) -> None:
    """A strength flag (--alpha, --var-p, ...) or a flag's own extra option (--vhr-layers, --sink,
    --kv-rule, ...) changed from its default while no flag that reads it is given: an error naming
    those flags (it would be ignored, and the run reported as if it had applied)."""
    if not hasattr(args, "edits"):  # a command without the edit flags (export has its own --sink, ...)
        return
    readers: dict[str, tuple[object, list[str]]] = {}  # dest -> (default, flags that read it)
    used = {flag.name for _, flag in given(args, ("switch", "file", "heads"))}
    if getattr(args, "random", None):
        used.add(getattr(args, "random_edit", None))
    for kind, flag in flags():
        if flag.strength:
            dest = flag.strength.replace("-", "_")
            readers.setdefault(dest, (kind.default_strength, []))[1].append(flag.name)
        if flag.arguments is not None:
            extra = argparse.ArgumentParser(add_help=False)
            flag.arguments(extra)
            for action in extra._actions:
                readers.setdefault(action.dest, (action.default, []))[1].append(flag.name)
    for dest, (default, names) in readers.items():
        if not used.intersection(names) and getattr(args, dest, default) != default:
            option = "--" + dest.replace("_", "-")
            raise HeadscopeError(f"{option} needs {' or '.join('--' + n for n in names)}; without it {option} "
                                 "would be ignored")


def build_edits(args, hm, rng: random.Random | None = None) -> list[Edit]:
    """The edits the --edits file and the switch / file flags ask for, in flag order (they compose)."""
    edits = load_edits(args.edits) if getattr(args, "edits", None) else []
    for kind, flag in given(args):
        edits += flag.build(args, hm, rng, None)
    return edits


def heads_edits(args, hm, name: str, heads) -> list[Edit]:
    """The edits of the heads flag ``name`` (e.g. "ablate") on ``heads``."""
    return heads_flag(name).build(args, hm, None, heads)


def heads_flag(name: str) -> registry.CliFlag:
    return {flag.name: flag for _, flag in heads_flags()}[name]


def describe(args, name: str) -> tuple[str, list[str]]:
    """How a heads flag is announced: (verb, details), e.g. ("ablating", ["zero"])."""
    flag = heads_flag(name)
    return flag.describe(args) if flag.describe else (f"{name} edit", [])


def report(args) -> list[str]:
    """The lines the given flags add before eval's metric (e.g. --kv-compress: the cache's bytes)."""
    return [line for _, flag in given(args) if flag.report is not None for line in flag.report(args)]


def is_random(args) -> bool:
    """Whether the edits are a random control to average over --draws."""
    return bool(getattr(args, "random_heads", False))
