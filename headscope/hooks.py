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
    """Where one architecture family keeps its attention: paths relative to the model.

    A family with several attention stacks (encoder-decoders: encoder self-attention, decoder
    self-attention, cross-attention) has one row per stack, with the same ``family`` and its own
    ``stack`` name; a model matches a family when every one of its rows is found. Layers are
    numbered stack by stack, in table order.
    """

    family: str
    layer_lists: tuple[str, ...]  # candidate paths of the ModuleList of blocks
    attention: str  # path, inside a block, of the module that calls the attention function
    out_proj: str  # path, inside a block, of the projection whose input is z
    stack: str = ""  # name of this stack in a multi-stack family ("encoder", "decoder", "cross")
    sparse: bool = False  # hybrid models: blocks without this attention (Mamba layers) are skipped
    calls: str = "registry"  # "registry": transformers' AttentionInterface; "sdpa": a direct torch SDPA call


ADAPTERS: tuple[Adapter, ...] = (
    # Llama, Mistral, Qwen2/3, Gemma 1-3, Phi-3, OLMo, DeepSeek (MLA), ...; LLaVA's language model
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
    Adapter("phi (self_attn.dense)", ("model.layers",), "self_attn", "self_attn.dense"),
    Adapter("gpt-neox / pythia (attention.dense)", ("gpt_neox.layers",), "attention", "attention.dense"),
    Adapter("gpt-j / codegen (attn.out_proj)", ("transformer.h",), "attn", "attn.out_proj"),
    Adapter("falcon (self_attention.dense)", ("transformer.h",), "self_attention", "self_attention.dense", calls="sdpa"),
    # encoder-decoders: BART, mBART, Pegasus, Marian (before OPT, whose decoder looks the same)
    Adapter("bart-like seq2seq", ("model.encoder.layers",), "self_attn", "self_attn.out_proj", stack="encoder"),
    Adapter("bart-like seq2seq", ("model.decoder.layers",), "self_attn", "self_attn.out_proj", stack="decoder"),
    Adapter("bart-like seq2seq", ("model.decoder.layers",), "encoder_attn", "encoder_attn.out_proj", stack="cross"),
    Adapter("t5", ("encoder.block",), "layer.0.SelfAttention", "layer.0.SelfAttention.o", stack="encoder"),
    Adapter("t5", ("decoder.block",), "layer.0.SelfAttention", "layer.0.SelfAttention.o", stack="decoder"),
    Adapter("t5", ("decoder.block",), "layer.1.EncDecAttention", "layer.1.EncDecAttention.o", stack="cross"),
    Adapter("opt (self_attn.out_proj)", ("model.decoder.layers", "decoder.layers"), "self_attn", "self_attn.out_proj"),
    # hybrids (Jamba, Bamba, ...): only the attention blocks
    Adapter("hybrid decoder (attention layers)", ("model.layers",), "self_attn", "self_attn.o_proj", sparse=True),
)

# model_type -> why headscope cannot hook it (checked before the table, so the error names the reason)
UNSUPPORTED: dict[str, str] = {
    "bloom": "BloomAttention computes its ALiBi attention inline (baddbmm + softmax), through neither "
    "transformers' attention registry nor torch's SDPA, so there is no call to hook",
    "mpt": "MptAttention computes its attention inline (matmul + softmax), through neither transformers' attention "
    "registry nor torch's SDPA, so there is no call to hook",
    "gpt_neo": "GPTNeoSelfAttention computes its attention inline (matmul + softmax), through neither transformers' "
    "attention registry nor torch's SDPA, so there is no call to hook",
}


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
    block: torch.nn.Module | None = None  # the whole layer; its input is the residual stream (None: cross-attention)
    name: str = ""  # dotted path of the attention module, e.g. "model.decoder.layers.0.encoder_attn"
    stack: str = ""  # "encoder", "decoder", "cross" in encoder-decoders, else ""
    block_path: str = ""  # dotted path of the block holding it, e.g. "model.decoder.layers.0"


def _find_stack(model: torch.nn.Module, adapter: Adapter) -> list[LayerModules] | None:
    for path in adapter.layer_lists:
        blocks = _get(model, path)
        if not isinstance(blocks, torch.nn.ModuleList) or len(blocks) == 0:
            continue
        layers = [
            LayerModules(_get(b, adapter.attention), _get(b, adapter.out_proj), None if adapter.stack == "cross" else b,
                         f"{path}.{i}.{adapter.attention}", adapter.stack, f"{path}.{i}")
            for i, b in enumerate(blocks)
        ]
        found = [lm for lm in layers if lm.attention is not None and lm.out_proj is not None]
        if found and (len(found) == len(layers) or adapter.sparse):
            return found
    return None


def find_layers(model: torch.nn.Module) -> tuple[Adapter, list[LayerModules]]:
    """The attention and output-projection module of every layer, via the adapter table."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in UNSUPPORTED:
        raise HeadscopeError(f"headscope cannot hook {type(model).__name__} ({model_type}): {UNSUPPORTED[model_type]}.")
    families = list(dict.fromkeys(a.family for a in ADAPTERS))
    for fam in families:
        rows = [a for a in ADAPTERS if a.family == fam]
        stacks = [_find_stack(model, a) for a in rows]
        if all(s is not None for s in stacks):
            return rows[0], [lm for s in stacks for lm in s]
    raise HeadscopeError(
        f"headscope cannot find the attention layers of {type(model).__name__}: its module layout matches "
        f"none of the supported families ({', '.join(families)}). Add an Adapter for it in headscope/hooks.py."
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
        from headscope_kernels import attention_with_stats

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
