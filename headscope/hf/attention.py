"""The attention router: headscope's function in transformers' attention-function registry.

Two ways into a model (see the README's design section):

1. Attention: a headscope attention function registered in transformers' ``AttentionInterface``.
   It receives q (after RoPE, [B, H, q, d]) and k, v ([B, Hkv, k, d], GQA not expanded). Layers
   with nothing asked of them go straight to the stock SDPA function. Families whose attention
   module calls torch's SDPA itself (``Adapter.calls == "sdpa"``, e.g. Falcon) have those calls
   routed instead.
2. Head outputs: a forward pre-hook on each layer's output projection (installed by HeadModel's
   hook table, headscope/model.py), where the input is the per-head output z viewed as
   [B, S, H, d_head].
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from headscope.errors import HeadscopeError
from headscope.hf.adapters import Adapter, LayerModules
from headscope_kernels import attention_with_stats

IMPLEMENTATION = "headscope"

# module -> callback(module, q, k, v, mask, scaling, **kwargs) -> output [B, q, H, d] or None (= stock)
_HANDLERS: "weakref.WeakKeyDictionary[torch.nn.Module, Callable]" = weakref.WeakKeyDictionary()


def kernel_arguments(module, query, attention_mask, scaling, kwargs) -> dict:
    """What a model's attention call does to the scores, as headscope_kernels arguments.

    Folds T5's relative ``position_bias`` into an additive mask, reads causality, the sliding
    window and Gemma 2's ``softcap``; refuses what the kernel cannot reproduce.
    """
    if kwargs.get("s_aux") is not None:
        raise HeadscopeError(
            f"{type(module).__name__} adds attention-sink logits (s_aux) to its softmax, which headscope's "
            "attention kernel does not reproduce; this family is not supported"
        )
    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", False) if is_causal is None else is_causal
    mask = attention_mask
    bias = kwargs.get("position_bias")
    if bias is not None:
        bias = bias.to(query.dtype)
        if mask is None:
            mask = bias
        elif mask.dtype == torch.bool:
            mask = bias.masked_fill(~mask, float("-inf"))
        else:
            mask = bias + mask
    return dict(
        scaling=scaling if scaling is not None else query.shape[-1] ** -0.5,
        causal=attention_mask is None and bool(is_causal),
        attn_mask=mask,
        sliding_window=kwargs.get("sliding_window"),
        softcap=kwargs.get("softcap"),
    )


def headscope_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Registered as attention implementation ``"headscope"``; idle layers run stock SDPA."""
    handler = _HANDLERS.get(module)
    if handler is not None:
        out = handler(module, query, key, value, attention_mask, scaling, dropout=dropout, **kwargs)
        if out is not None:
            return out, None
    return stock_attention(module, query, key, value, attention_mask, scaling, dropout, **kwargs), None


def stock_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs) -> torch.Tensor:
    """The layer's own attention output as [B, q, H, d]: stock SDPA, or the streamed kernel for what
    SDPA cannot do (logit softcapping)."""
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        args = kernel_arguments(module, query, attention_mask, scaling, kwargs)
        scale = args.pop("scaling")
        out = attention_with_stats(query, key, value, scale, q_offset=key.shape[2] - query.shape[2], **args).out
        return out.transpose(1, 2).contiguous()
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)[0]


# Families whose attention module calls torch's SDPA itself (Adapter.calls == "sdpa", e.g. Falcon):
# while such a module runs its forward, its SDPA call is routed to the module's handler.
_SDPA_ORIGINAL = torch.nn.functional.scaled_dot_product_attention
_sdpa_module: "list[torch.nn.Module]" = []  # the sdpa-calling attention module(s) now running
_sdpa_users = 0


def _sdpa_router(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    handler = _HANDLERS.get(_sdpa_module[-1]) if _sdpa_module else None
    if handler is None or kwargs:
        return _SDPA_ORIGINAL(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                              scale=scale, **kwargs)
    module = _sdpa_module.pop()  # SDPA calls made by the handler itself (its stock path) go to torch
    try:
        causal = is_causal or (attn_mask is None and query.shape[2] > 1 and getattr(module, "is_causal", False))
        out = handler(module, query, key, value, attn_mask, scale, is_causal=causal)
    finally:
        _sdpa_module.append(module)
    if out is None:
        return _SDPA_ORIGINAL(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                              scale=scale)
    return out.transpose(1, 2)


def route_sdpa_calls(modules: list[torch.nn.Module]) -> Callable[[], None]:
    """Route the torch SDPA calls made inside ``modules``' forwards to their handlers; returns the undo."""
    global _sdpa_users

    def enter(module, args, kwargs):
        _sdpa_module.append(module)

    def leave(module, args, kwargs, output):
        _sdpa_module.remove(module)

    handles = []
    for m in modules:
        handles.append(m.register_forward_pre_hook(enter, with_kwargs=True))
        handles.append(m.register_forward_hook(leave, with_kwargs=True, always_call=True))
    _sdpa_users += 1
    torch.nn.functional.scaled_dot_product_attention = _sdpa_router

    def undo() -> None:
        global _sdpa_users
        for h in handles:
            h.remove()
        _sdpa_users -= 1
        if _sdpa_users == 0:
            torch.nn.functional.scaled_dot_product_attention = _SDPA_ORIGINAL

    return undo


AttentionInterface.register(IMPLEMENTATION, headscope_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, sdpa_mask)


def set_handler(module: torch.nn.Module, handler: Callable | None) -> None:
    if handler is None:
        _HANDLERS.pop(module, None)
    else:
        _HANDLERS[module] = handler


def use_headscope_attention(model: torch.nn.Module, adapter: Adapter | None = None,
                            layers: list[LayerModules] | None = None) -> Callable[[], None]:
    """Route the model's attention through the layer handlers; returns the undo function.

    Registry families switch to the ``"headscope"`` attention implementation; SDPA-calling
    families (``Adapter.calls == "sdpa"``) run in ``"sdpa"`` mode with their SDPA calls routed.
    """
    config = model.config
    before = {id(c): (c, c._attn_implementation) for c in _configs(config)}

    def undo() -> None:
        for c, impl in before.values():
            c._attn_implementation = impl

    if adapter is not None and adapter.calls == "sdpa":
        for c, _ in before.values():
            c._attn_implementation = "sdpa"
        unroute = route_sdpa_calls([lm.attention for lm in layers or []])

        def undo_both() -> None:
            unroute()
            undo()

        return undo_both
    try:
        model.set_attn_implementation(IMPLEMENTATION)
    except Exception as exc:  # transformers refuses models that don't use the attention registry
        raise HeadscopeError(
            f"{type(model).__name__}'s attention cannot be hooked: transformers refused to route it through "
            f"the attention-function registry ({exc}). headscope needs a model whose attention uses "
            "transformers' AttentionInterface."
        ) from None
    return undo


def _configs(config) -> list:
    out = [config]
    for name in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, name, None)
        if sub is not None and hasattr(sub, "_attn_implementation"):
            out.extend(_configs(sub))
    return out


def has_handler(module: torch.nn.Module) -> bool:
    """True while a handler is set for ``module``."""
    return module in _HANDLERS
