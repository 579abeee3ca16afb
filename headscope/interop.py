"""Run headscope edits through nnsight 0.8 or a TransformerLens 4.x TransformerBridge.

Edits of kind zero / mean / scale / patch only touch a head's output z (the input of o_proj), so
they need no custom attention function and can be written as plain nnsight traces or as
TransformerLens hooks on ``blocks.L.attn.hook_z`` (in TransformerLens 4.3 an alias of
``blocks.L.attn.o.hook_in``, shape [B, S, H, d_head]). Query edits (query_scale, uniform) need
headscope's attention hook: use :func:`headscope.interventions.intervene`.

On NDIF (``remote=True``) the server has no headscope: build a plan of plain data before the trace
and run it with :mod:`headscope.remote`, whose code needs only torch and nnsight (it ships by value).
Ships' KL per head runs the same way (query or output ablation, :func:`ships_plan`).

    lm = nnsight_model(hm)                                  # wraps the same HF model
    plan = nnsight_plan(lm, edits, ids.shape, sources=nnsight_sources(lm, edits))
    with lm.trace(ids, remote=True):                        # or remote="local" to simulate
        remote.apply_plan(lm, plan)
        logits = lm.output.logits.save()

    bridge = bridge_from_hf(copy.deepcopy(hm.model))        # the bridge rewires the model in place
    logits = bridge.run_with_hooks(ids, fwd_hooks=bridge_hooks(bridge, edits))

Both paths run one forward over the whole sequence (positions 0..S-1; pass ``prompt_length`` to
mark rows >= it as decode rows) with the same formula as headscope's hooks
(:func:`headscope.interventions.edits.apply_z_edit`).
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch

from headscope import remote
from headscope.errors import HeadscopeError
from headscope.heads import head_masks
from headscope.hf.adapters import find_layers
from headscope.interventions import registry
from headscope.interventions.edits import Edit, _patch_values, _Positions, apply_z_edit, edit_weights, model_shape
from headscope.model import HeadModel


def _z_edits(edits: Edit | Sequence[Edit]) -> list[Edit]:
    edits = [edits] if isinstance(edits, Edit) else list(edits)
    remote_kinds = registry.remote_kinds()  # the kinds headscope.remote runs (EditKind.remote)
    bad = [e.kind for e in edits if e.kind not in remote_kinds]
    if bad:
        raise HeadscopeError(
            f"edit kind(s) {bad} change the attention itself and need headscope's attention hook; "
            f"nnsight traces and TransformerLens hooks run only {list(remote_kinds)}. Use headscope.interventions.intervene"
        )
    return edits


def _checked(edits: Edit | Sequence[Edit], shape: registry.ModelShape) -> list[Edit]:
    """The z-edits, each checked against the model before any trace (heads in its grid, source ids in
    its vocabulary: the kinds' ``check_against``, as ``intervene`` does)."""
    edits = _z_edits(edits)
    for e in edits:
        registry.get(e.kind).check_against(e, shape)
    return edits


def _bridge_shape(bridge) -> registry.ModelShape:
    c = bridge.cfg
    return registry.ModelShape(c.n_layers, c.n_heads, getattr(c, "n_key_value_heads", None) or c.n_heads, c.d_head,
                               c.d_model, c.d_vocab)


def _rows(n: int, batch: int, edit: Edit, prompt_length: int | None, attention_mask, device) -> torch.Tensor:
    return _Positions(prompt_length or n, attention_mask).mask(edit, range(n), batch, device)


# ------------------------------------------------------------------------------------- nnsight
def nnsight_model(model, tokenizer=None):
    """An nnsight ``TransformersModel`` around an already-loaded HF model (or a HeadModel's)."""
    from nnsight.modeling.transformers import TransformersModel  # optional (headscope[interop])

    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    model = getattr(model, "model", model) if hasattr(model, "geometry") else model
    if tokenizer is None:
        raise HeadscopeError("nnsight needs the model's tokenizer: nnsight_model(model, tokenizer=...)")
    return TransformersModel(model, task="text-generation", tokenizer=tokenizer)


def _out_proj_paths(model: torch.nn.Module) -> list[str]:
    """Dotted module names of each layer's output projection (headscope's adapter table)."""
    _, layers = find_layers(model)
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(layer.out_proj)] for layer in layers]


def _hf(lm) -> torch.nn.Module:
    """The HF model inside an nnsight model (0.8 keeps it in ``_module``)."""
    model = lm.__dict__.get("_module")
    return model if model is not None else lm._model


def _geometry(model):
    return HeadModel(model).geometry


def nnsight_sources(lm, edits: Sequence[Edit]) -> dict[int, dict[int, torch.Tensor]]:
    """Mean / patch values of ``edits`` computed with nnsight traces: {edit index: {layer: tensor}}."""
    model = _hf(lm)
    edits = _checked(edits, model_shape(HeadModel(model)))
    g = _geometry(model)
    paths = _out_proj_paths(model)
    out: dict[int, dict[int, torch.Tensor]] = {}
    for i, e in enumerate(edits):
        if e.kind not in ("mean", "patch"):
            continue
        layers = sorted({l for l, _ in e.heads})
        ids = torch.tensor(e.source)
        saved: dict[int, torch.Tensor] = {}  # filled inside the trace (a function's new locals are not written back)
        with torch.no_grad(), lm.trace(ids):
            for l in layers:
                saved[l] = remote.module(lm, paths[l]).input.save()
        zs = {l: torch.as_tensor(v).reshape(*ids.shape, g.n_heads, g.head_dim) for l, v in saved.items()}
        out[i] = {l: z.mean((0, 1)) if e.kind == "mean" else z for l, z in zs.items()}
    return out


def nnsight_plan(lm, edits: Sequence[Edit], shape, *, sources=None, prompt_length: int | None = None,
                 attention_mask=None) -> list[dict]:
    """The z-edits for an input of ``shape`` (batch, tokens) as a plan of plain data (module paths,
    ints, tensors) that :func:`headscope.remote.apply_plan` applies inside a trace with torch and
    nnsight alone, i.e. also on an NDIF server.

    ``sources``: from :func:`nnsight_sources` (needed for mean / patch edits).
    """
    model = _hf(lm)
    edits = _checked(edits, model_shape(HeadModel(model)))
    g = _geometry(model)
    paths = _out_proj_paths(model)
    if sources is None and any(e.kind in ("mean", "patch") for e in edits):
        raise HeadscopeError("mean / patch edits need sources=nnsight_sources(lm, edits), computed before the trace")
    sources = sources or {}
    batch, n = int(shape[0]), int(shape[1])
    plan = []
    for layer in sorted({l for e in edits for l, _ in e.heads}):  # nnsight: modules in execution order
        steps = []
        for i, e in enumerate(edits):
            keep = _rows(n, batch, e, prompt_length, attention_mask, "cpu")
            weights = edit_weights(e, layer, keep, g.n_heads)
            if weights is None:
                continue
            source = sources.get(i, {}).get(layer)
            if e.kind == "patch":
                dummy = torch.zeros(batch, n, g.n_heads, g.head_dim, dtype=source.dtype)
                source = _patch_values(source, range(n), dummy, keep)
            if e.kind == "inject":
                source = e.source[layer]
            steps.append({"kind": e.kind, "weight": weights[0].detach(), "hit": weights[1], "source": source})
        plan.append({"path": paths[layer], "n_heads": g.n_heads, "head_dim": g.head_dim, "edits": steps})
    _ship_by_value()
    return plan


def apply_edits_nnsight(lm, edits: Sequence[Edit], shape, *, sources=None, prompt_length: int | None = None,
                        attention_mask=None) -> None:
    """Inside ``with lm.trace(ids):``, apply ``edits`` to the heads' z (o_proj inputs) of an input of
    ``shape`` (``ids.shape``). For NDIF build the plan before the trace (:func:`nnsight_plan`) and
    call :func:`headscope.remote.apply_plan` inside it."""
    remote.apply_plan(lm, nnsight_plan(lm, edits, shape, sources=sources, prompt_length=prompt_length,
                                       attention_mask=attention_mask))


def ships_plan(lm, heads: Sequence[tuple[int, int]], eps: float = 1e-4, ablation: str = "query") -> dict:
    """A Ships plan for :func:`headscope.remote.ships_kl`: run the query as ``len(heads) + 1`` copies
    (``ids.expand(len(heads) + 1, -1)``); copy 0 is the model as it is, copy r scales head
    ``heads[r - 1]``'s queries (``query``, the paper's ablation; scaling q_proj's output equals scaling q
    after RoPE, which is linear) or its output z (``output``) by ``eps``."""
    model = _hf(lm)
    g = _geometry(model)
    if ablation not in ("query", "output"):
        raise HeadscopeError(f"unknown Ships ablation {ablation!r}; choose 'query' or 'output'")
    _, layers = find_layers(model)
    names = {id(m): n for n, m in model.named_modules()}
    scale = torch.ones(len(heads) + 1, g.n_layers, g.n_heads)  # row 0: no head ablated; row r: head r - 1
    if heads:
        scale[1:][torch.stack([head_masks([h], g.n_layers, g.n_heads) for h in heads])] = eps
    steps = []
    for layer in sorted({l for l, _ in heads}):
        target = layers[layer].out_proj
        if ablation == "query":
            target = getattr(layers[layer].attention, "q_proj", None)
            if target is None:
                raise HeadscopeError(f"{type(model).__name__} has no separate q_proj to scale in a trace; "
                                     "use ablation='output'")
        steps.append({"path": names[id(target)], "scale": scale[:, layer]})
    _ship_by_value()
    return {"layers": steps, "ablation": ablation, "head_dim": g.head_dim}


def _ship_by_value() -> None:
    """Ship headscope.remote's source with nnsight requests (an NDIF server has no headscope)."""
    import nnsight  # optional (headscope[interop])

    nnsight.register(remote)


# ------------------------------------------------------------------------------------- TransformerLens
def bridge_from_hf(model, tokenizer=None):
    """A TransformerLens 4.x TransformerBridge around an already-loaded HF causal LM.

    The bridge replaces the model's submodules in place (and may switch it to eager attention):
    pass a copy (``copy.deepcopy(model)``) to keep using the original with headscope.
    """
    from transformer_lens.model_bridge.sources import build_bridge_from_module  # optional (headscope[interop])

    archs = getattr(model.config, "architectures", None) or [type(model).__name__]
    return build_bridge_from_module(model, archs[0], hf_config=copy.deepcopy(model.config), tokenizer=tokenizer)


def bridge_sources(bridge, edits: Sequence[Edit]) -> dict[int, dict[int, torch.Tensor]]:
    """Mean / patch values of ``edits`` read from the bridge's ``hook_z``."""
    out: dict[int, dict[int, torch.Tensor]] = {}
    for i, e in enumerate(_checked(edits, _bridge_shape(bridge))):
        if e.kind not in ("mean", "patch"):
            continue
        layers = sorted({l for l, _ in e.heads})
        names = {f"blocks.{l}.attn.hook_z" for l in layers}
        with torch.no_grad():
            _, cache = bridge.run_with_cache(torch.tensor(e.source), names_filter=lambda n: n in names)
        zs = {l: cache[f"blocks.{l}.attn.hook_z"] for l in layers}
        out[i] = {l: z.mean((0, 1)) if e.kind == "mean" else z for l, z in zs.items()}
    return out


def bridge_hooks(bridge, edits: Sequence[Edit], *, sources=None, prompt_length: int | None = None,
                 attention_mask=None) -> list[tuple[str, object]]:
    """``fwd_hooks`` for ``bridge.run_with_hooks``: the edits on ``blocks.L.attn.hook_z``."""
    edits = _checked(edits, _bridge_shape(bridge))
    if sources is None:
        sources = bridge_sources(bridge, edits)
    available = set(bridge.hook_dict)
    result = []
    for layer in sorted({l for e in edits for l, _ in e.heads}):
        name = f"blocks.{layer}.attn.hook_z"
        if name not in available:
            raise HeadscopeError(f"the bridge has no hook {name!r}; its attention hooks: "
                                 f"{sorted(n for n in available if n.startswith(f'blocks.{layer}.attn'))[:10]}")

        def hook(z, hook, layer=layer):
            for i, e in enumerate(edits):
                if any(l == layer for l, _ in e.heads):
                    keep = _rows(z.shape[1], z.shape[0], e, prompt_length, attention_mask, z.device)
                    z = apply_z_edit(e, layer, z, keep, range(z.shape[1]), sources.get(i, {}).get(layer))
            return z

        result.append((name, hook))
    return result
