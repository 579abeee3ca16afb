"""The only module that touches Hugging Face internals.

Two ways into a model (see the README's design section):

1. Attention: a headscope attention function registered in transformers' ``AttentionInterface``.
   It receives q (after RoPE, [B, H, q, d]) and k, v ([B, Hkv, k, d], GQA not expanded). Layers
   with nothing asked of them go straight to the stock SDPA function.
2. Head outputs: a forward pre-hook on each layer's output projection, where the input is the
   per-head output z viewed as [B, S, H, d_head].

Architecture differences live in ``ADAPTERS`` and nowhere else.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from headscope.errors import HeadscopeError

IMPLEMENTATION = "headscope"


@dataclass(frozen=True)
class Adapter:
    """Where one architecture family keeps its attention: paths relative to the model."""

    family: str
    layer_lists: tuple[str, ...]  # candidate paths of the ModuleList of blocks
    attention: str  # path, inside a block, of the module that calls the attention function
    out_proj: str  # path, inside a block, of the projection whose input is z


ADAPTERS: tuple[Adapter, ...] = (
    # Llama, Mistral, Qwen2/3, Gemma, Phi-3, OLMo, ...; LLaVA's language model
    Adapter(
        "decoder (self_attn.o_proj)",
        ("model.layers", "model.language_model.layers", "language_model.model.layers", "model.text_model.layers",
         "layers"),
        "self_attn",
        "self_attn.o_proj",
    ),
    Adapter("gpt2 (attn.c_proj)", ("transformer.h", "h"), "attn", "attn.c_proj"),
    Adapter(
        "bert-like encoder (attention.self)",
        ("encoder.layer", "bert.encoder.layer", "model.encoder.layer", "roberta.encoder.layer"),
        "attention.self",
        "attention.output.dense",
    ),
)


def _get(root: torch.nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


@dataclass
class LayerModules:
    attention: torch.nn.Module
    out_proj: torch.nn.Module
    block: torch.nn.Module | None = None  # the whole layer; its input is the residual stream


def find_layers(model: torch.nn.Module) -> tuple[Adapter, list[LayerModules]]:
    """The attention and output-projection module of every layer, via the adapter table."""
    for adapter in ADAPTERS:
        for path in adapter.layer_lists:
            blocks = _get(model, path)
            if not isinstance(blocks, torch.nn.ModuleList) or len(blocks) == 0:
                continue
            layers = [LayerModules(_get(b, adapter.attention), _get(b, adapter.out_proj), b) for b in blocks]
            if all(lm.attention is not None and lm.out_proj is not None for lm in layers):
                return adapter, layers
    families = ", ".join(a.family for a in ADAPTERS)
    raise HeadscopeError(
        f"headscope cannot find the attention layers of {type(model).__name__}: its module layout matches "
        f"none of the supported families ({families}). Add an Adapter for it in headscope/hooks.py."
    )


def residual_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """A decoder block's residual-stream input, from its forward pre-hook (positional or keyword)."""
    return args[0] if args else kwargs.get("hidden_states")


QKV_PROJECTIONS = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"))  # Llama-style, BERT-style


def qkv_projections(attention: torch.nn.Module) -> tuple[torch.nn.Module, ...] | None:
    """The separate query / key / value projections of an attention module, if it has them."""
    for names in QKV_PROJECTIONS:
        modules = tuple(getattr(attention, n, None) for n in names)
        if all(isinstance(m, torch.nn.Module) for m in modules):
            return modules
    return None


# --------------------------------------------------------------------------- attention function
# module -> callback(module, q, k, v, mask, scaling, **kwargs) -> output [B, q, H, d] or None (= stock)
_HANDLERS: "weakref.WeakKeyDictionary[torch.nn.Module, Callable]" = weakref.WeakKeyDictionary()


def headscope_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Registered as attention implementation ``"headscope"``; idle layers run stock SDPA."""
    handler = _HANDLERS.get(module)
    if handler is not None:
        out = handler(module, query, key, value, attention_mask, scaling, dropout=dropout, **kwargs)
        if out is not None:
            return out, None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def stock_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs) -> torch.Tensor:
    """The stock SDPA output as [B, q, H, d]."""
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)[0]


AttentionInterface.register(IMPLEMENTATION, headscope_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, sdpa_mask)


def set_handler(module: torch.nn.Module, handler: Callable | None) -> None:
    if handler is None:
        _HANDLERS.pop(module, None)
    else:
        _HANDLERS[module] = handler


def use_headscope_attention(model: torch.nn.Module) -> Callable[[], None]:
    """Route the model's attention through ``headscope_attention``; returns the undo function."""
    config = model.config
    before = {id(c): (c, c._attn_implementation) for c in _configs(config)}
    try:
        model.set_attn_implementation(IMPLEMENTATION)
    except Exception as exc:  # transformers refuses models that don't use the attention registry
        raise HeadscopeError(
            f"{type(model).__name__}'s attention cannot be hooked: transformers refused to route it through "
            f"the attention-function registry ({exc}). headscope needs a model whose attention uses "
            "transformers' AttentionInterface."
        ) from None

    def undo() -> None:
        for c, impl in before.values():
            c._attn_implementation = impl

    return undo


def _configs(config) -> list:
    out = [config]
    for name in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, name, None)
        if sub is not None and hasattr(sub, "_attn_implementation"):
            out.extend(_configs(sub))
    return out
