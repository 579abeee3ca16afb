"""Head edits as data, and applying them to a HeadModel during forward passes and generate().

An :class:`Edit` names its kind, heads, strength, positions and scope. It prints, compares with
``==``, saves to JSON and loads back; a list of edits composes (applied in order)::

    edits = [Edit("uniform", [(2, 3)], scope="decode"), Edit("scale", [(1, 0)], strength=-1.0)]
    save_edits(edits, "edits.json"); assert load_edits("edits.json") == edits
    with intervene(hm, edits):
        hm.model.generate(ids, max_new_tokens=8)

Kinds (docs/METHODS.md, "Interventions"), with strength ``s`` and the head's output z:

- ``zero``:    z' = (1 - s) z                      (s = 1: the head's output is 0)
- ``mean``:    z' = z + s (mean - z)               mean of z over a reference dataset (cached)
- ``patch``:   z' = z + s (z_source - z)           z of another input at the same positions
  (``resample`` is an alias)
- ``inject``:  z' = z + s (m - z) = (1 - s) z + s m   m a given vector per head, ``source`` [L, H, d]:
  soft injection of a task embedding, s = alpha (Park & Rhee 2025; headscope.methods.soft_injection)
- ``scale``:   z' = s z                            reweighting; negative s allowed [2.0, VHR]
- ``query_scale``: q' = s q                        Ships ablation, s = eps [1e-4] (Zhou et al. 2024)
- ``uniform``: q' = (1 - s) q                      s = 1: query 0, uniform attention over the causal
  prefix (DeCoRe's masking, Gema et al. 2024)

Every kind, ``var`` (Kang et al. 2025) included, is declared once in its own module of
``headscope.interventions.kinds`` as an :class:`~headscope.interventions.registry.EditKind`: its
options (``Edit.options``, a JSON dict checked by the kind's frozen options dataclass), default
strength, hooks and command-line flags. ``intervene``, ``generate`` and ``eval`` read the registry;
a new method is one module plus its ``register`` call.

``strength`` may be a float, a per-head list, or a torch tensor (scalar or one per head) that
requires grad: every edit is differentiable in its strength.

Positions: ``"all"``, ``"last"`` (the last row of each forward call: the prompt's last token at
prefill, the new token at each decode step), or ``(start, stop)`` absolute positions. Scope:
``"prefill"`` (positions < prompt length), ``"decode"`` (>= prompt length) or ``"both"``. With a KV
cache a decode step's row sits at position >= prompt length; the prompt length is the number of
rows of the latest forward call that starts at position 0, i.e. the latest prefill, so several
generate() calls can share one block (or pass ``prompt_length``, e.g. for a loop without a cache). With left
padding, ranges count from each row's first real token: the mask is taken from each model call's
``attention_mask`` (generate() passes it), or give ``attention_mask`` to ``intervene``.
"""

from __future__ import annotations

import contextlib
import hashlib
import weakref
import json
import operator
import os
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from headscope import remote, scope
from headscope.errors import HeadscopeError
from headscope.heads import as_heads, format_heads, head_masks
from headscope.hf.inputs import image_token_id
from headscope.interventions import registry
from headscope.io import write_whole
from headscope.scores import HeadScores
from headscope.validate import check_finite, read_json

Head = tuple[int, int]
SCOPES = ("both", "prefill", "decode")


def _strength_value(strength):
    if isinstance(strength, torch.Tensor):
        return strength.detach().cpu().tolist()
    return strength


@dataclass(eq=False)
class Edit:
    """One head edit (see the module docstring for the kinds and their formulas)."""

    kind: str
    heads: Sequence[Head]
    strength: float | list | torch.Tensor | None = None
    positions: str | tuple[int, int] = "all"
    scope: str = "both"
    source: list | torch.Tensor | None = field(default=None, repr=False)  # token ids [B][S]: reference (mean) /
    # source (patch); for inject the vectors m [layers, heads, head_dim]
    options: dict | None = None  # the kind's options (JSON values; registry.EditKind.options checks them)

    def __post_init__(self):
        kind = registry.get(self.kind)  # an alias ("ablate", "resample", ...) becomes its kind's name
        self.kind = kind.name
        self.heads = tuple(as_heads(self.heads))  # (layer, head) pairs or names: "L1H5, L1H4"
        twice = sorted(h for h, n in Counter(self.heads).items() if n > 1)
        if twice:
            raise HeadscopeError(f"head(s) {format_heads(twice)} listed more than once in a {kind.label} edit (their "
                                 "strengths would add up); list each head once")
        if kind.needs_heads and not self.heads:
            raise HeadscopeError(f"a {kind.label} edit needs at least one head; got an empty list, which would edit "
                                 "nothing (name the heads, e.g. [[1, 5]] or \"L1H5\")")
        if self.strength is None:
            self.strength = kind.default_strength
        if isinstance(self.strength, (list, tuple)):
            self.strength = [check_finite(x, "edit strength") for x in self.strength]
        elif isinstance(self.strength, torch.Tensor):
            if not torch.isfinite(self.strength.detach()).all():
                raise HeadscopeError(f"edit strength must be finite numbers; got {self.strength}")
        else:
            check_finite(self.strength, "edit strength")
        _check_float32(self.strength, kind.label)
        n = _numel(self.strength)
        if n not in (1, len(self.heads)):
            raise HeadscopeError(
                f"strength must be one number or one per head ({len(self.heads)}); got {n} values"
            )
        if isinstance(self.positions, list):
            self.positions = tuple(self.positions)
        if not (self.positions in ("all", "last") or (
            isinstance(self.positions, tuple) and len(self.positions) == 2
            and all(isinstance(p, int) for p in self.positions) and 0 <= self.positions[0] < self.positions[1]
        )):
            raise HeadscopeError(
                f"positions must be 'all', 'last' or (start, stop) with 0 <= start < stop; got {self.positions!r}"
            )
        if self.scope not in SCOPES:
            raise HeadscopeError(f"unknown scope {self.scope!r}; choose one of {SCOPES}")
        if kind.source == "ids":
            if self.source is None:
                raise HeadscopeError(
                    f"a {kind.name} edit needs source token ids (the "
                    f"{'reference dataset' if kind.name == 'mean' else 'source input'}), "
                    "e.g. Edit('%s', heads, source=ids)" % kind.name
                )
            self.source = _as_rows(self.source)
        elif kind.source == "vectors":
            try:
                self.source = torch.as_tensor(self.source, dtype=torch.float32).detach()
            except (TypeError, ValueError, RuntimeError):
                self.source = None
            if self.source is None or self.source.dim() != 3:
                raise HeadscopeError(f"an {kind.name} edit needs source = the vectors to inject, [layers, heads, "
                                     "head_dim] (e.g. a task embedding from headscope.methods.soft_injection)")
        elif self.source is not None:
            with_source = [k.name for k in registry.kinds().values() if k.source]
            raise HeadscopeError(f"a {kind.name} edit takes no source; only {', '.join(with_source)} edits do")
        if self.options:
            self.options = dict(self.options)
        self.config = kind.make_options(self.options)  # the options dataclass: each value's range checked
        if kind.check is not None:
            kind.check(self)

    # ---------------------------------------------------------------- data
    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "heads": [list(h) for h in self.heads],
            "strength": _strength_value(self.strength),
            "positions": self.positions if isinstance(self.positions, str) else list(self.positions),
            "scope": self.scope,
            "source": self.source.tolist() if isinstance(self.source, torch.Tensor) else self.source,
            **({"options": self.options} if self.options else {}),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Edit":
        unknown = set(data) - {"kind", "heads", "strength", "positions", "scope", "source", "options"}
        if unknown or "kind" not in data or ("heads" not in data and _needs_heads(data["kind"])):
            raise HeadscopeError(f"an edit needs 'kind' and 'heads' and no other keys than strength, positions, "
                                 f"scope, source, options; got keys {sorted(data)}")
        positions = data.get("positions", "all")
        return cls(data["kind"], data.get("heads", ()), data.get("strength"),
                   tuple(positions) if isinstance(positions, list) else positions,
                   data.get("scope", "both"), data.get("source"), data.get("options"))

    def __eq__(self, other) -> bool:
        return isinstance(other, Edit) and self.to_dict() == other.to_dict()

    def __add__(self, other):
        return [self] + (list(other) if isinstance(other, (list, tuple)) else [other])

    def strengths(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """One strength per head, [len(heads)], keeping the autograd graph of a tensor strength."""
        s = self.strength if isinstance(self.strength, torch.Tensor) else torch.tensor(self.strength, dtype=dtype)
        s = s.to(device=device, dtype=dtype)
        return s.reshape(-1).expand(len(self.heads)) if s.numel() == 1 else s


def _needs_heads(kind) -> bool:
    """Whether edits of ``kind`` name their heads (VAR, VHR and kv_compress may leave them out)."""
    return registry.get(kind).needs_heads if isinstance(kind, str) else True


FLOAT32_MAX = torch.finfo(torch.float32).max


def _check_float32(strength, label: str) -> None:
    """Strengths apply as float32 tensors: a finite Python float beyond float32's range turns infinite."""
    values = strength.detach().abs().max().item() if isinstance(strength, torch.Tensor) and strength.numel() else (
        max((abs(x) for x in strength), default=0.0) if isinstance(strength, list) else abs(strength))
    if values > FLOAT32_MAX:
        raise HeadscopeError(f"{label} edit strength {values:g} is beyond float32's range (|s| <= {FLOAT32_MAX:.3g}), "
                             "where edits compute: it would be infinite; give a smaller strength")


def _numel(strength) -> int:
    if isinstance(strength, torch.Tensor):
        return strength.numel()
    if isinstance(strength, list):
        return len(strength)
    return 1


def _as_rows(ids) -> list[list[int]]:
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    if ids and isinstance(ids[0], int):
        ids = [ids]
    try:
        rows = [[operator.index(t) for t in row] for row in ids]
    except (TypeError, ValueError):
        raise HeadscopeError("source must be token ids: a list of ints, a list of rows or a tensor") from None
    if not rows or not rows[0] or len({len(r) for r in rows}) != 1:
        raise HeadscopeError("source rows must be non-empty and of equal length (pad them)")
    return rows


# -------------------------------------------------------------------- building from rankings
def edits_from_scores(scores, kind: str = "zero", *, top: int | None = None, threshold: float | None = None,
                      heads: Iterable[Head] | None = None, **kwargs) -> Edit:
    """One edit on the heads of a ranking (HeadScores or a ranking CSV path): top-k, a threshold,
    or an explicit head list (exactly one of them)."""
    if sum(x is not None for x in (top, threshold, heads)) != 1:
        raise HeadscopeError("choose the heads with exactly one of top=K, threshold=T or heads=[(layer, head), ...]")
    if heads is not None:
        return Edit(kind, list(heads), **kwargs)
    if not isinstance(scores, HeadScores):
        scores = HeadScores.from_csv(scores)
    chosen = scores.top(top) if top is not None else scores.above(threshold)
    return Edit(kind, chosen, **kwargs)


def save_edits(edits: Edit | Sequence[Edit], path: str | os.PathLike) -> Path:
    """Write edits as a JSON list, whole (temp file + rename)."""
    edits = [edits] if isinstance(edits, Edit) else list(edits)
    return write_whole(path, json.dumps([e.to_dict() for e in edits], indent=2) + "\n")


def load_edits(path: str | os.PathLike) -> list[Edit]:
    """Edits from a JSON file written by :func:`save_edits` (a list of edit objects, or one)."""
    data = read_json(path, "edits file", "write it with save_edits")
    data = [data] if isinstance(data, dict) else data
    if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
        raise HeadscopeError(f"edits file {path} must hold a JSON list of edit objects (as save_edits writes)")
    if not data:
        raise HeadscopeError(f"edits file {path} holds no edits; add at least one edit object")
    return [Edit.from_dict(d) for d in data]


# -------------------------------------------------------------------- reference activations
# model -> {(kind, digest of the source ids): activations}; weak, so a collected model's entries go
# with it (an id() key could be reused by a new model and serve it stale activations)
_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, dict[int, torch.Tensor]]]" = weakref.WeakKeyDictionary()


@torch.no_grad()
def source_z(hm, kind: str, source: list[list[int]], pad_id: int | None = None) -> dict[int, torch.Tensor]:
    """Per layer: mean z [H, d] over the reference rows and positions (mean), or z [B, S, H, d] (patch).
    Computed once per (model, source) and cached, from the unedited model: every probe and edit open
    when it is first needed is suspended for the reference run (``headscope.scope.suspended``)."""
    cache = _CACHE.setdefault(hm.model, {})
    key = (kind, hashlib.sha1(json.dumps(source).encode()).hexdigest())
    if key not in cache:
        ids = torch.tensor(source, device=hm.device)
        mask = torch.ones_like(ids) if pad_id is None else (ids != pad_id).long()
        with scope.suspended(), hm.capture_z() as cap:
            hm.model(input_ids=ids, attention_mask=mask)
        if kind == "mean":
            w = mask.to(cap.z[0].dtype).view(*mask.shape, 1, 1)
            cache[key] = {l: (z * w).sum((0, 1)) / w.sum() for l, z in cap.z.items()}
        else:
            cache[key] = dict(cap.z)
    return cache[key]


def clear_cache() -> None:
    """Forget cached mean / patch activations (e.g. after changing the model's weights)."""
    _CACHE.clear()


# -------------------------------------------------------------------- applying
class _Positions:
    """Which rows of a forward call an edit selects: a [B, S] float mask."""

    def __init__(self, prompt_length: int | None, attention_mask: torch.Tensor | None):
        self.prompt_length = prompt_length
        self.fixed = prompt_length is not None
        self.offsets = None
        self.batch = 1
        if attention_mask is not None:
            self.use_mask(attention_mask)

    def use_mask(self, attention_mask) -> None:
        """Left padding: count ranges from each row's first real token."""
        am = torch.as_tensor(attention_mask)
        self.offsets = (am.shape[1] - am.sum(1)).long()  # pads before the first real token
        self.batch = am.shape[0]

    def infer_mask(self, owner: int):
        """A model forward pre-hook: take the mask of each forward call (generate() passes one), so a
        left-padded batch is counted right without giving ``attention_mask`` to ``intervene`` too."""
        def hook(module, args, kwargs):
            mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
            if threading.get_ident() == owner and isinstance(mask, torch.Tensor) and mask.dim() == 2:
                self.use_mask(mask)

        return hook

    def observe(self, positions: range) -> None:
        """Unless given, the prompt length is the row count of the latest call that starts at 0 (a new
        prefill: several generate() calls may share one block), else where the first call starts."""
        if self.fixed:
            return
        if positions.start == 0:
            self.prompt_length = len(positions)
        elif self.prompt_length is None:
            self.prompt_length = positions.start

    def mask(self, edit: Edit, positions: range, batch: int, device) -> torch.Tensor:
        self.observe(positions)
        pos = torch.arange(positions.start, positions.stop, device=device).view(1, -1).expand(batch, -1)
        keep = torch.ones(batch, len(positions), dtype=torch.bool, device=device)
        if edit.scope == "prefill":
            keep &= pos < self.prompt_length
        elif edit.scope == "decode":
            keep &= pos >= self.prompt_length
        if edit.positions == "last":
            keep[:, :-1] = False
        elif isinstance(edit.positions, tuple):
            rel = pos - (self.offsets.to(device).view(-1, 1) if self.offsets is not None else 0)
            keep &= (rel >= edit.positions[0]) & (rel < edit.positions[1])
        return keep


def _head_weights(edit: Edit, layer: int, n_heads: int, device, dtype) -> torch.Tensor | None:
    """[H] strength per head of this layer (0 where the edit does not touch), or None."""
    idx = [i for i, (l, _) in enumerate(edit.heads) if l == layer]
    if not idx:
        return None
    s = edit.strengths(device, dtype)
    heads = torch.tensor([edit.heads[i][1] for i in idx], device=device)
    return torch.zeros(n_heads, device=device, dtype=dtype).index_add(0, heads, s[idx])


def _head_hits(edit: Edit, layer: int, n_heads: int, device, dtype) -> torch.Tensor:
    """[H] 1.0 on this layer's heads of the edit, else 0."""
    mask = head_masks([(0, h) for l, h in edit.heads if l == layer], 1, n_heads)[0]
    return mask.to(device=device, dtype=dtype)


@contextlib.contextmanager
def intervene(hm, edits: Edit | Sequence[Edit], *, prompt_length: int | None = None,
              attention_mask: torch.Tensor | None = None, pad_id: int | None = None) -> Iterator[None]:
    """Apply ``edits`` (in order) to every forward pass inside the block, generate() included.

    Each edit's kind (the registry) prepares it before any hook is installed (reference
    activations, shape checks), then installs its hooks through HeadModel's context managers, so
    they are removed on exit, also after an exception. ``pad_id``: padding in mean-edit reference rows.
    The edits apply where the block was opened (its thread and asyncio task; in a generator's body,
    the generator's own forward passes only: headscope.scope); mean and patch reference activations
    are computed from the unedited model, whatever else is open.
    """
    edits = [edits] if isinstance(edits, Edit) else list(edits)
    for e in edits:
        if not isinstance(e, Edit):
            raise HeadscopeError(f"intervene takes Edit objects; got {type(e).__name__}")
    kinds = [registry.get(e.kind) for e in edits]
    check_edits(hm, edits)
    # prepared before any hook is installed (reference activations come from the unedited model)
    prepared = [kind.prepare(hm, e, pad_id) if kind.prepare else None for kind, e in zip(kinds, edits)]
    state = _Positions(prompt_length, attention_mask)
    with contextlib.ExitStack() as stack:
        if edits:
            stack.enter_context(hm.hook_module(hm.model, finite_logits(edits, threading.get_ident()), with_kwargs=True))
        if attention_mask is None and any(isinstance(e.positions, tuple) for e in edits):
            stack.enter_context(hm.hook_module(hm.model, state.infer_mask(threading.get_ident()), pre=True,
                                               with_kwargs=True))
        for kind, e, ready in zip(kinds, edits, prepared):
            stack.enter_context(kind.apply(hm, e, state, ready))
        yield


def check_edits(hm, edits: Sequence[Edit]) -> None:
    """Each edit against ``hm`` (its kind's ``check_against``: heads, source, options), before any
    forward runs under it."""
    shape = model_shape(hm)
    for e in edits:
        registry.get(e.kind).check_against(e, shape)


def model_shape(hm) -> registry.ModelShape:
    """The shape edits are checked against: the head grid, width, vocabulary (the input embedding
    table's rows) and whether the model takes images."""
    g, config = hm.geometry, hm.model.config
    embeddings = hm.model.get_input_embeddings() if hasattr(hm.model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None)
    if vocab is None:
        vocab = getattr(config.get_text_config() if hasattr(config, "get_text_config") else config, "vocab_size")
    vision = hasattr(config, "vision_config") and image_token_id(config) is not None
    return registry.ModelShape(g.n_layers, g.n_heads, g.n_kv_heads, g.head_dim, g.d_model, int(vocab), vision)


def describe(edit: Edit) -> str:
    """One line naming an edit: kind, heads, strength (e.g. ``scale on 2 heads (L1H5, L1H4), strength 2``)."""
    kind = registry.get(edit.kind)
    s = torch.as_tensor(_strength_value(edit.strength), dtype=torch.float64).flatten()
    strength = f"{s[0].item():g}" if bool((s == s[0]).all()) else f"{s.min().item():g}..{s.max().item():g}"
    if edit.heads:
        names = format_heads(edit.heads[:4]) + (", ..." if len(edit.heads) > 4 else "")
        heads = f"{len(edit.heads)} head{'s' * (len(edit.heads) != 1)} ({names})"
    else:
        heads = "every head" if kind.name == "var" else "the heads it chooses"
    return f"{edit.kind} on {heads}, strength {strength}"


def finite_logits(edits: Sequence[Edit], owner: int):
    """A forward hook (with kwargs) on the model: logits that are NaN or infinite, or equal over the whole
    vocabulary (a residual stream beyond float32's range squares to inf in the next norm, which then
    outputs 0), on any real row under ``edits`` stop the run with an error naming the edits (an edit
    too strong for the model) instead of decoding garbage."""
    def hook(module, args, kwargs, output):
        if threading.get_ident() != owner:
            return None
        logits = getattr(output, "logits", None)
        if logits is None and isinstance(output, (tuple, list)) and output:
            logits = output[0]
        if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.dim() < 2:
            return None
        rows = logits.detach().reshape(-1, logits.shape[-1])
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and tuple(mask.shape) == tuple(logits.shape[:2]):
            rows = rows[mask.reshape(-1).to(rows.device).bool()]  # left padding: only real rows count
        if not rows.numel():
            return None
        if not bool(torch.isfinite(rows).all()):
            what = "NaN or infinite"
        elif logits.shape[-1] > 1 and bool((rows.amax(-1) == rows.amin(-1)).any()):
            what = "equal over the whole vocabulary (the residual stream overflowed float32 in a norm)"
        else:
            return None
        raise HeadscopeError(f"the model's logits turned {what} under the edit(s) "
                             + "; ".join(describe(e) for e in edits)
                             + ": the edit is too strong for this model; lower its strength")

    return hook


@contextlib.contextmanager
def z_hook(hm, edit: Edit, state: _Positions, sources: dict[int, torch.Tensor] | None = None) -> Iterator[None]:
    """The ``apply`` of a kind that edits head outputs z (``apply_z_edit``); ``sources``: per layer."""
    layers = {l for l, _ in edit.heads}

    def z_edit(layer: int, z: torch.Tensor, positions: range) -> torch.Tensor:
        if layer not in layers:
            return z
        keep = state.mask(edit, positions, z.shape[0], z.device)
        return apply_z_edit(edit, layer, z, keep, positions, (sources or {}).get(layer))

    with hm.edit_z(z_edit):
        yield


@contextlib.contextmanager
def query_hook(hm, edit: Edit, state: _Positions, factor) -> Iterator[None]:
    """The ``apply`` of a kind that multiplies the queries of its heads by ``factor(s)`` (s: the
    strength per head) on the rows it selects."""
    g = hm.geometry

    def scale_for(layer: int):
        def scale(positions: range) -> torch.Tensor:
            s = _head_weights(edit, layer, g.n_heads, hm.device, torch.float32)
            keep = state.mask(edit, positions, state.batch, hm.device).float()
            hit = _head_hits(edit, layer, g.n_heads, hm.device, torch.float32)
            per_row = 1 + hit.view(1, -1, 1) * keep.unsqueeze(1) * (factor(s) - 1).view(1, -1, 1)  # [B, H, rows]
            return per_row.unsqueeze(-1)

        return scale

    with contextlib.ExitStack() as stack:
        for layer in sorted({l for l, _ in edit.heads}):
            stack.enter_context(hm.scale_queries(layer, scale_for(layer)))
        yield


def apply_z_edit(edit: Edit, layer: int, z: torch.Tensor, keep: torch.Tensor, positions: range,
                 source: torch.Tensor | None = None) -> torch.Tensor:
    """One z-edit on one layer's head outputs z [B, S, H, d]; ``keep`` [B, S] selects the rows.

    ``source``: the mean [H, d] (mean edit) or the source run's z [B|1, S_src, H, d] (patch edit).
    Shared by headscope's hooks and the nnsight / TransformerLens paths (headscope.interop).
    """
    weights = edit_weights(edit, layer, keep, z.shape[2], z.dtype)
    if weights is None:
        return z
    if edit.kind == "patch":
        source = _patch_values(source, positions, z, keep.view(keep.shape[0], -1))
    if edit.kind == "inject" and source is None:  # nnsight / TransformerLens paths
        source = edit.source[layer]
    return remote.z_edit(edit.kind, z, *weights, source)


def edit_weights(edit: Edit, layer: int, keep: torch.Tensor, n_heads: int, dtype=torch.float32):
    """(weight, hit), each [B|1, S, H, 1]: the edit's strength / 1 on the rows ``keep`` [B|1, S]
    selects and the heads it edits in ``layer``, else 0; None where it edits no head there."""
    s = _head_weights(edit, layer, n_heads, keep.device, dtype)
    if s is None:
        return None
    keep = keep.to(dtype).view(*keep.shape, 1, 1)
    return keep * s.view(1, 1, -1, 1), keep * _head_hits(edit, layer, n_heads, keep.device, dtype).view(1, 1, -1, 1)


def _patch_values(source: torch.Tensor, positions: range, z: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The source run's z at this call's positions ([B or 1, S, H, d]); an error where an edited
    position lies beyond the source."""
    n_src = source.shape[1]
    if positions.stop > n_src:
        beyond = keep[:, max(0, n_src - positions.start):].any() if positions.start < n_src else keep.any()
        if beyond:
            raise HeadscopeError(
                f"the patch source has {n_src} positions, but the edit selects position(s) up to "
                f"{positions.stop - 1}; restrict the edit's positions or use scope='prefill'"
            )
    if source.shape[0] not in (1, z.shape[0]):
        raise HeadscopeError(f"the patch source has {source.shape[0]} rows; the input has {z.shape[0]} (give 1 or {z.shape[0]})")
    lo, hi = min(positions.start, n_src), min(positions.stop, n_src)
    vals = source[:, lo:hi].to(z)
    if hi - lo < z.shape[1]:  # rows beyond the source are not edited (checked above): fill with z
        fill = z[:, hi - lo :] if vals.shape[0] == z.shape[0] else z[:1, hi - lo :]
        vals = torch.cat([vals.expand(z.shape[0], -1, -1, -1), fill.expand(z.shape[0], -1, -1, -1)], dim=1)
    return vals
