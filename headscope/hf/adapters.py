"""The adapter table: where each architecture family keeps its attention, as data.

Architecture differences live in ``ADAPTERS`` and nowhere else; a model no row matches gets an
error naming this file, where its row goes. Also the module-layout facts headscope reads from a
model (q/k/v projections, a block's residual input, a projection's input width).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from headscope.errors import HeadscopeError


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
        f"none of the supported families ({', '.join(families)}). Add a row for it to ADAPTERS in headscope/hf/adapters.py."
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




def in_features(module: torch.nn.Module) -> int:
    """Input width of a projection: nn.Linear (in_features) or GPT-2's Conv1D (nx)."""
    width = getattr(module, "in_features", None) or getattr(module, "nx", None)
    return int(width if width is not None else module.weight.shape[-1])
