"""A TransformerLens-style activation cache: ``run_with_cache`` under TransformerLens hook names.

    logits, cache = run_with_cache(hm, input_ids)
    cache["blocks.1.attn.hook_z"]          # [B, S, H, d_head]   each head's output (the o_proj input)
    cache["blocks.1.attn.hook_pattern"]    # [B, H, S, S]        attention pattern (short contexts only)

Names and shapes are those of TransformerLens 4's TransformerBridge (tests check equality on the
organisms):

    blocks.L.hook_resid_pre      [B, S, d_model]  the layer's input (residual stream)
    blocks.L.hook_resid_post     [B, S, d_model]  the layer's output
    blocks.L.attn.hook_q         [B, S, H, d]     query projection (before rotary embeddings)
    blocks.L.attn.hook_k/hook_v  [B, S, Hkv, d]   key / value projections (GQA: not repeated)
    blocks.L.attn.hook_rot_q     [B, S, H, d]     queries as attention uses them (after RoPE)
    blocks.L.attn.hook_rot_k     [B, S, Hkv, d]   keys as attention uses them (after RoPE)
    blocks.L.attn.hook_z         [B, S, H, d]     per-head output z
    blocks.L.attn.hook_pattern   [B, H, S, S]     softmax attention weights

hook_q/k/v are read at the model's separate q/k/v projections; a model with a fused projection
(GPT-2's c_attn) gives the attention function's inputs instead (GPT-2 has no rotary embeddings,
so they are the same). The pattern is the one tensor of size [H, N, N]: it is built only up to
``max_pattern_tokens`` keys (a clear error beyond); for long contexts use
``HeadModel.attention_stats``, which never builds it.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import torch

from headscope.hf.adapters import qkv_projections
from headscope.hf.attention import kernel_arguments
from headscope.errors import HeadscopeError

MAX_PATTERN_TOKENS = 2048
LAYER_HOOKS = ("hook_resid_pre", "hook_resid_post")
ATTN_HOOKS = ("hook_q", "hook_k", "hook_v", "hook_rot_q", "hook_rot_k", "hook_z", "hook_pattern")


def hook_names(n_layers: int) -> list[str]:
    """Every name ``run_with_cache`` can return, in execution order."""
    names = []
    for layer in range(n_layers):
        names.append(f"blocks.{layer}.hook_resid_pre")
        names += [f"blocks.{layer}.attn.{h}" for h in ATTN_HOOKS]
        names.append(f"blocks.{layer}.hook_resid_post")
    return names


def attention_pattern(query, key, *, scaling, causal=False, attn_mask=None, sliding_window=None,
                      softcap=None) -> torch.Tensor:
    """softmax(q k^T * scaling + mask) as float32 [B, H, q, k], for short contexts (it builds the
    pattern). Arguments as :func:`headscope.hf.attention.kernel_arguments` returns them; query rows sit at the
    last n_q key positions. GQA by index (query heads h share kv head h // (H / Hkv)). Rows with no
    allowed key are 0."""
    B, H, n_q, d = query.shape
    hkv, n_k = key.shape[1], key.shape[2]
    q = query.float().reshape(B, hkv, (H // hkv) * n_q, d)
    scores = torch.matmul(q, key.float().transpose(-1, -2)).view(B, H, n_q, n_k) * scaling
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    masked = attn_mask is not None or sliding_window or (causal and n_q > 1)  # one causal last row sees all keys
    if attn_mask is not None:
        mask = attn_mask[..., -n_q:, -n_k:] if attn_mask.shape[-2] > 1 else attn_mask[..., -n_k:]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    if (causal and n_q > 1) or sliding_window:
        rows = torch.arange(n_k - n_q, n_k, device=query.device).view(-1, 1)
        cols = torch.arange(n_k, device=query.device).view(1, -1)
        allowed = cols <= rows if causal else torch.ones_like(cols <= rows)
        if sliding_window:
            allowed &= cols > rows - sliding_window
        scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return weights.nan_to_num_(0.0) if masked else weights


def run_with_cache(hm, input_ids: torch.Tensor, *, names_filter: Callable[[str], bool] | Iterable[str] | None = None,
                   max_pattern_tokens: int = MAX_PATTERN_TOKENS, **forward_kwargs):
    """One forward pass; returns ``(logits, cache)`` with ``cache`` a dict of TransformerLens hook
    names to tensors (detached). ``names_filter``: a predicate or a list of names (default: all)."""
    g = hm.geometry
    every = hook_names(g.n_layers)
    if names_filter is None:
        wanted = set(every)
    elif callable(names_filter):
        wanted = {n for n in every if names_filter(n)}
    else:
        wanted = set(names_filter)
        unknown = sorted(wanted - set(every))
        if unknown:
            raise HeadscopeError(f"unknown hook name(s) {unknown[:5]}; run_with_cache gives {ATTN_HOOKS} under "
                                 f"blocks.L.attn and {LAYER_HOOKS} under blocks.L (L in 0..{g.n_layers - 1})")
    input_ids = torch.as_tensor(input_ids)
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    n = input_ids.shape[-1]
    if any(name.endswith("hook_pattern") for name in wanted) and n > max_pattern_tokens:
        raise HeadscopeError(
            f"hook_pattern over {n} tokens would build {g.n_heads} x {n} x {n} weights per layer; it is limited to "
            f"{max_pattern_tokens} tokens (max_pattern_tokens=). For long contexts use hm.attention_stats (top-1 "
            "key, mass on key groups, entropy, attention received), which never builds the pattern"
        )
    cache: dict[str, torch.Tensor] = {}

    def want(layer: int, hook: str) -> bool:
        return f"blocks.{layer}.{hook}" in wanted

    def put(layer: int, hook: str, value: torch.Tensor) -> None:
        cache[f"blocks.{layer}.{hook}"] = value.detach()

    def tap(layer, query, key, value, mask, scaling, module, kwargs):
        projections = qkv_projections(module) is not None
        if want(layer, "attn.hook_rot_q"):
            put(layer, "attn.hook_rot_q", query.transpose(1, 2))
        if want(layer, "attn.hook_rot_k"):
            put(layer, "attn.hook_rot_k", key.transpose(1, 2))
        if not projections:
            for name, tensor in (("hook_q", query), ("hook_k", key), ("hook_v", value)):
                if want(layer, f"attn.{name}"):
                    put(layer, f"attn.{name}", tensor.transpose(1, 2))
        if want(layer, "attn.hook_pattern"):
            args = kernel_arguments(module, query, mask, scaling, kwargs)
            put(layer, "attn.hook_pattern", attention_pattern(query, key, **args).to(query.dtype))

    def projection_hook(layer: int, name: str, n_heads: int):
        def hook(module, args, output):
            if want(layer, f"attn.{name}"):
                put(layer, f"attn.{name}", output.view(*output.shape[:-1], n_heads, -1))
        return hook

    def resid_pre(layer: int, hidden: torch.Tensor) -> None:
        if want(layer, "hook_resid_pre"):
            put(layer, "hook_resid_pre", hidden)

    def resid_post(layer: int):
        def hook(module, args, output):
            if want(layer, "hook_resid_post"):
                put(layer, "hook_resid_post", output[0] if isinstance(output, tuple) else output)
        return hook

    z_layers = [layer for layer in range(g.n_layers) if want(layer, "attn.hook_z")]
    with contextlib.ExitStack() as stack:  # every hook through HeadModel's hook table
        for layer, modules in enumerate(hm._layers):
            projections = qkv_projections(modules.attention)
            if projections is not None:
                for name, proj, heads in zip(("hook_q", "hook_k", "hook_v"), projections,
                                             (g.n_heads, g.n_kv_heads, g.n_kv_heads)):
                    stack.enter_context(hm.hook_module(proj, projection_hook(layer, name, heads)))
            if modules.block is not None:
                stack.enter_context(hm.hook_module(modules.block, resid_post(layer)))
        stack.enter_context(hm.watch_residual(resid_pre))
        stack.enter_context(hm.tap_attention(tap))
        capture = stack.enter_context(hm.capture_z(z_layers)) if z_layers else None
        with torch.no_grad():
            output = hm.model(input_ids.to(hm.device), **forward_kwargs)
    if capture is not None:
        for layer in z_layers:
            put(layer, "attn.hook_z", capture.z[layer])
    missing = sorted(wanted - set(cache))
    if missing:
        raise HeadscopeError(f"{type(hm.model).__name__} produced no value for {missing[:5]}: these hooks are not "
                             "supported for this architecture")
    return getattr(output, "logits", output), cache
