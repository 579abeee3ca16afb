"""Loading a transformers model: the auto class (from the auto classes' ``_model_mapping``), the
attention implementation, accelerate's ``device_map`` / offload, the tokenizer and the processor."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import weakref
from typing import Iterator

import torch
import transformers as tf
from transformers.utils import logging as hf_logging

from headscope.errors import HeadscopeError
from headscope.organisms import ORGANISMS



def auto_classes() -> tuple:
    """The auto classes tried in order (read on use: transformers builds them lazily)."""
    return (tf.AutoModelForImageTextToText, tf.AutoModelForCausalLM, tf.AutoModelForSeq2SeqLM,
            tf.AutoModelForSpeechSeq2Seq, tf.AutoModelForMaskedLM)


def load_config(source: str):
    """The model's config, or a clear error naming what to do (offline, bad config.json)."""
    try:
        return tf.AutoConfig.from_pretrained(source)
    except (ValueError, KeyError) as exc:  # a readable config.json transformers cannot use
        raise HeadscopeError(f"{source}/config.json is not a config transformers can load ({exc})") from None
    except OSError as exc:
        raise HeadscopeError(
            f"could not load {source!r}: it is not a local model folder, not a shipped organism "
            f"({', '.join(ORGANISMS)}), and it could not be fetched from the Hugging Face hub "
            f"({type(exc).__name__}; offline={os.environ.get('HF_HUB_OFFLINE', '0')}). Download it on a "
            "machine with network access (huggingface-cli download ID --local-dir DIR) and pass the "
            "local folder, e.g. --model ./DIR"
        ) from None


def text_config(config):
    """The language model's config (the config itself for text-only models)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def load_pretrained(source: str, *, dtype: torch.dtype, device=None, device_map=None, max_memory: dict | None = None,
                    offload_folder: str | None = None, **kwargs):
    """``(model, tokenizer, processor)`` from a local folder or hub id; see ``HeadModel.load``."""
    config = load_config(source)
    auto = auto_class(config)
    # SDPA cannot softcap attention logits (Gemma 2): such models run eager outside headscope's hooks
    kwargs.setdefault("attn_implementation",
                      "eager" if getattr(text_config(config), "attn_logit_softcapping", None) else "sdpa")
    made = None  # the temp offload folder made here (removed when empty after loading, else with the model)
    if device_map is not None or max_memory is not None:
        if device is not None:
            raise HeadscopeError("give either device (one device) or device_map / max_memory (split over devices), not both")
        made = None if offload_folder else tempfile.mkdtemp(prefix="headscope-offload-")
        kwargs.update(device_map=device_map or "auto", max_memory=max_memory, offload_folder=offload_folder or made)
    model = None
    try:
        with no_loading_bars():
            model = auto.from_pretrained(source, dtype=dtype, **kwargs)
    except (ValueError, KeyError) as exc:
        if "device_map" not in kwargs:
            raise
        raise HeadscopeError(f"could not split {source!r} over devices with device_map={kwargs['device_map']!r}: "
                             f"{exc}") from None
    finally:
        if made is not None:
            _drop_offload_folder(made, model)
    if isinstance(device_map, dict):
        _check_map_modules(model, device_map, source)
    model.eval()
    if device is not None:
        model.to(device)
    return model, load_tokenizer(source), load_processor(source, config)


def _check_map_modules(model, device_map: dict, source: str) -> None:
    """A JSON device map naming modules the model does not have (a typo such as model.layrs.0) is an
    error: transformers leaves such keys unused, and the modules meant stay where it puts them."""
    names = {name for name, _ in model.named_modules()}
    unknown = [key for key in device_map if key and key not in names]
    if unknown:
        example = next((n for n in sorted(names) if n.count(".") == 2 and ".layers." in n), "model.layers.0")
        raise HeadscopeError(f"--device-map names module(s) {', '.join(map(repr, unknown))} that {source} does not "
                             f"have; use module names of the model (model.named_modules()), e.g. {example!r}")


def _drop_offload_folder(folder: str, model) -> None:
    """Remove a temp offload folder: now when nothing was offloaded into it (safetensors checkpoints
    are read in place) or the load failed, else when the model is collected or the process exits."""
    if model is None or not os.listdir(folder):
        shutil.rmtree(folder, ignore_errors=True)
    else:
        weakref.finalize(model, shutil.rmtree, folder, ignore_errors=True)


def load_tokenizer(source: str):
    """The tokenizer alone (no weights), or None when ``source`` has none that loads here."""
    try:
        return tf.AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError):
        return None


@contextlib.contextmanager
def no_loading_bars() -> Iterator[None]:
    """transformers' per-tensor "Loading weights" bar is noise around a model load; restored after."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_processor(source: str, config):
    """The processor of an image-text model folder (None for text models or when it has none)."""
    if not hasattr(config, "vision_config"):
        return None
    try:
        return tf.AutoProcessor.from_pretrained(source)
    except (OSError, ValueError, TypeError, ImportError):
        return None


def auto_class(config):
    """The auto class whose mapping holds the config's architecture (T5/BART -> Seq2SeqLM, LLaVA ->
    ImageTextToText, Llama -> CausalLM); without ``architectures``, a guess from the config."""
    archs = getattr(config, "architectures", None) or []
    for auto in auto_classes():
        mapping = auto._model_mapping
        if type(config) in mapping:
            classes = mapping[type(config)]
            names = {c.__name__ for c in (classes if isinstance(classes, (tuple, list)) else (classes,))}
            if names & set(archs):
                return auto
    if hasattr(config, "vision_config"):
        return tf.AutoModelForImageTextToText
    if getattr(config, "is_encoder_decoder", False):
        return tf.AutoModelForSeq2SeqLM
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs) or getattr(config, "is_decoder", False):
        return tf.AutoModelForCausalLM
    if not archs and config.model_type in ("llama", "gpt2", "qwen2", "mistral", "gemma", "phi3"):
        return tf.AutoModelForCausalLM
    return tf.AutoModel
