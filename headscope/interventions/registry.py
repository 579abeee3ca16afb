"""Edit kinds, each declared once: ``EditKind`` and the registry ``intervene`` and the CLI read.

A kind says everything about itself in one place:

- ``name`` (and ``aliases``), ``default_strength`` and ``check`` (extra rules on strength, positions);
- ``options``: a frozen dataclass whose ``__post_init__`` checks each value's range; an ``Edit``
  carries the values as a JSON dict and validates them by building this dataclass;
- ``source``: what ``Edit.source`` holds (None, token ``"ids"`` or ``"vectors"`` [L, H, d]);
- ``needs_heads``: an edit of the kind names its heads (an empty list is an error); False for kinds
  that choose their own (VHR, kv_compress) or read no heads as every head (VAR);
- ``check_against(edit, shape)``: everything about an edit that depends on the model (:class:`ModelShape`:
  heads, source token ids or vectors, the options' own ``check_against(shape)``), before its first forward;
- ``prepare(hm, edit, pad_id)`` (before any hook: reference activations, shape checks) and
  ``apply(hm, edit, state, prepared)``: a context manager installing the kind's hooks;
- ``remote``: whether ``headscope.remote.z_edit`` runs it (nnsight / NDIF, TransformerLens);
- ``flags``: its command-line flags (``CliFlag``); option fields with a ``help`` in their metadata
  become ``--FLAG-FIELD`` options with the dataclass default, checked before any model loads.

A new intervention is one module (in ``headscope/interventions/kinds/`` or any package) that calls
:func:`register`; third parties list the module in the entry-point group ``headscope.edit_kinds``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable

from headscope.errors import HeadscopeError
from headscope.heads import format_heads

ENTRY_POINTS = "headscope.edit_kinds"


@dataclass(frozen=True)
class NoOptions:
    """The options of a kind that takes none."""


@dataclass(frozen=True)
class CliFlag:
    """One command-line flag that turns into edits of a kind (``headscope generate`` and ``eval``).

    ``takes``: ``"switch"`` (``--var``), ``"file"`` (``--inject FILE``) or ``"heads"`` (``--ablate
    [CSV]`` with ``--top K`` / ``--heads NAMES``). ``strength``: the flag carrying the strength,
    with the kind's default and the kind's checks (None: no strength flag). ``options``: which
    option fields get ``--NAME-FIELD`` flags (default: every field with a ``help`` in its metadata).
    ``arguments(parser)``: further flags. ``check(args)``: read its files before the model loads.
    ``build(args, hm, rng, heads)`` -> edits (``heads``: the --top / --heads choice, for "heads").
    ``describe(args)`` -> (verb, details): how the commands announce a "heads" flag.
    ``probe``: whether the values are checked by building an edit of no heads before the model loads
    (False for kinds whose edits need the model, e.g. kv_compress's KV heads: ``check`` does it).
    ``random``: the flag honours ``--random-heads`` (a random-heads control of the same size).
    ``report(args)`` -> lines ``headscope eval`` prints before the metric (e.g. the KV cache's bytes).
    """

    name: str
    help: str
    build: Callable
    takes: str = "switch"
    strength: str | None = None
    options: tuple[str, ...] | None = None
    arguments: Callable | None = None
    check: Callable | None = None
    metavar: str | None = None
    describe: Callable | None = None
    probe: bool = True
    random: bool = False
    report: Callable | None = None

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")


@dataclass(frozen=True)
class ModelShape:
    """What an edit is checked against before the model's first forward under it (a HeadModel's:
    ``headscope.interventions.edits.model_shape``)."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_model: int
    vocab_size: int
    vision: bool = False  # an image-text model (VAR and VHR need one: their apply says so otherwise)


@dataclass(frozen=True)
class EditKind:
    name: str
    apply: Callable  # (hm, edit, state, prepared) -> context manager
    doc: str = ""
    options: type = NoOptions
    default_strength: float = 1.0
    check: Callable | None = None  # (edit) -> None: rules beyond the options' ranges
    prepare: Callable | None = None  # (hm, edit, pad_id) -> prepared data, before any hook is installed
    source: str | None = None  # None | "ids" | "vectors"
    remote: bool = False
    aliases: tuple[str, ...] = ()
    flags: tuple[CliFlag, ...] = field(default=())
    label: str = ""  # how errors name the kind (default: its name), e.g. "VAR"
    needs_heads: bool = True  # False: no heads means the kind's own choice (VHR, kv_compress) or every head (VAR)

    def __post_init__(self):
        if not self.label:
            object.__setattr__(self, "label", self.name)

    def make_options(self, values: dict | None) -> Any:
        """The options dataclass for ``values`` (defaults filled in); its ``__post_init__`` checks ranges."""
        values = dict(values or {})
        names = {f.name for f in dataclasses.fields(self.options)}
        unknown = set(values) - names
        if unknown:
            if not names:
                raise HeadscopeError(f"a {self.name} edit takes no options; got {sorted(unknown)}")
            raise HeadscopeError(f"unknown {self.label} option(s) {sorted(unknown)}; choose from {sorted(names)}")
        try:
            return self.options(**values)
        except TypeError as exc:
            raise HeadscopeError(f"bad {self.label} options {values}: {exc}") from None

    def check_against(self, edit, shape: ModelShape) -> None:
        """``edit`` against the model it is about to run on, before the first forward: the source (an
        inject edit's vectors first: made for another model says so), the heads, then the options'
        ``check_against(shape)``. One-line errors naming the edit, the field and the valid range."""
        if self.source == "vectors" and tuple(edit.source.shape) != (shape.n_layers, shape.n_heads, shape.head_dim):
            raise HeadscopeError(
                f"{self.label} edit: its vectors have shape {list(edit.source.shape)} but the model has "
                f"[{shape.n_layers}, {shape.n_heads}, {shape.head_dim}] (layers, heads, head_dim): they were made for "
                "another model; fit a task embedding for this one (headscope inject fit --model ...)")
        bad = [h for h in edit.heads if not (0 <= h[0] < shape.n_layers and 0 <= h[1] < shape.n_heads)]
        if bad:
            raise HeadscopeError(f"{self.label} edit: invalid head(s) {format_heads(bad)}: this model has layers "
                                 f"0..{shape.n_layers - 1} and heads 0..{shape.n_heads - 1}")
        if self.source == "ids":
            ids = [t for row in edit.source for t in row]
            if min(ids) < 0 or max(ids) >= shape.vocab_size:
                bad_id = min(ids) if min(ids) < 0 else max(ids)
                raise HeadscopeError(f"{self.label} edit: source token id {bad_id} is outside this model's vocabulary "
                                     f"(ids 0..{shape.vocab_size - 1}); encode the source with this model's tokenizer")
        check = getattr(edit.config, "check_against", None)
        if check is not None:
            check(shape)

    def cli_options(self, flag: CliFlag) -> list[dataclasses.Field]:
        """The option fields ``flag`` exposes on the command line."""
        fields = dataclasses.fields(self.options)
        if flag.options is not None:
            return [f for f in fields if f.name in flag.options]
        return [f for f in fields if "help" in f.metadata]


_KINDS: dict[str, EditKind] = {}
_ALIASES: dict[str, str] = {}
_loaded_entry_points = False


def register(kind: EditKind) -> EditKind:
    """Add a kind to the registry (a second kind of the same name is an error)."""
    if kind.name in _KINDS or kind.name in _ALIASES:
        if _KINDS.get(kind.name) is kind:
            return kind
        raise HeadscopeError(f"edit kind {kind.name!r} is registered twice; give the new one another name")
    if not dataclasses.is_dataclass(kind.options) or not kind.options.__dataclass_params__.frozen:
        raise HeadscopeError(f"edit kind {kind.name!r}: options must be a frozen dataclass")
    _KINDS[kind.name] = kind
    for alias in kind.aliases:
        _ALIASES[alias] = kind.name
    return kind


def unregister(name: str) -> None:
    """Remove a kind (tests that register their own)."""
    kind = _KINDS.pop(name, None)
    for alias in kind.aliases if kind else ():
        _ALIASES.pop(alias, None)


def load_entry_points(again: bool = False) -> None:
    """Import the modules third parties list in the ``headscope.edit_kinds`` entry-point group (once;
    ``again``: look again, e.g. after a package was installed in this process)."""
    global _loaded_entry_points
    if _loaded_entry_points and not again:
        return
    _loaded_entry_points = True
    for entry in metadata.entry_points(group=ENTRY_POINTS):
        entry.load()


def kinds() -> dict[str, EditKind]:
    """Every registered kind by name, in registration order (third parties' included)."""
    load_entry_points()
    return dict(_KINDS)


def aliases() -> dict[str, str]:
    load_entry_points()
    return dict(_ALIASES)


def get(name: str) -> EditKind:
    """The kind named ``name`` (or an alias of it)."""
    found = kinds()
    name = _ALIASES.get(name, name)
    if name not in found:
        raise HeadscopeError(f"unknown edit kind {name!r}; choose one of {list(found) + list(_ALIASES)}")
    return found[name]


def remote_kinds() -> tuple[str, ...]:
    """The kinds ``headscope.remote`` runs (nnsight traces, NDIF, TransformerLens hooks)."""
    return tuple(name for name, kind in kinds().items() if kind.remote)
