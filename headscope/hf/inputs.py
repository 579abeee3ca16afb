"""Model inputs as transformers expects them: the image token, left-padded position ids, the pad id.

One rule for each, used everywhere in the package:

- :func:`image_token_id`: the id of the image placeholder in input_ids (``image_token_id`` /
  ``image_token_index`` in the config);
- :func:`left_padded_positions`: position ids counted from each row's first real token, what
  ``generate()`` computes, so a left-padded row computes what it computes alone;
- :func:`pad_id`: the tokenizer's pad token, else its end-of-sequence token, else 0;
- :func:`cached_length`: how much of a forward call the KV cache already holds.
"""

from __future__ import annotations

import torch


def image_token_id(config) -> int | None:
    """The id of the image placeholder token in input_ids (``image_token_id`` / ``image_token_index``)."""
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def left_padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids [B, N] of left-padded rows: 0 at each row's first real token (padding gets 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def with_positions(config, batch: dict) -> dict:
    """Left-padded inputs with :func:`left_padded_positions`. Batches without padding, with their own
    position ids, or of families with their own multi-axis positions (Qwen2-VL's M-RoPE, computed
    from the mask by the model) are left as they are."""
    mask = batch.get("attention_mask")
    if mask is None or "position_ids" in batch or bool(mask.all()) or "qwen" in config.model_type:
        return batch
    return dict(batch, position_ids=left_padded_positions(mask))


def cached_length(kwargs: dict) -> int:
    """How many positions the KV cache of a model's forward call already holds (0: a prefill), from
    the call's keyword inputs (transformers 5.2x names the cache ``cache``, earlier ``past_key_values``)."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None or not hasattr(cache, "get_seq_length"):
        return 0
    return int(cache.get_seq_length())


def pad_id(tokenizer) -> int:
    """The id to pad with: the tokenizer's pad token, else its end-of-sequence token, else 0."""
    for value in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if value is not None:
            return int(value)
    return 0
