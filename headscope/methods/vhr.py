"""VHR, Vision-aware Head Reinforcement (He et al. 2025; docs/METHODS.md, "VHR"): scale the heads
whose VHD (headscope.analyzers.vision) marks them as looking at the image, chosen from this input's
own VHD. A method: it combines the VHD analyzer with the ``scale`` edit and, with ``reselect``, owns
its decoding loop. The edit kind ``vhr`` (headscope.interventions.kinds.vhr, ``--vhr per-input``) does
the same inside any generate() call; ``--vhr CSV`` scales the heads of a saved VHD ranking (a variant).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from headscope import vision
from headscope.analyzers.vision import default_layers, head_divergence, outlier_filter, select_heads
from headscope.errors import HeadscopeError
from headscope.interventions import Edit, intervene
from headscope.model import HeadModel
from headscope.scores import HeadScores

Head = tuple[int, int]


@torch.no_grad()
def vhr_generate(hm: HeadModel, image, prompt: str, alpha: float = 2.0, *, layers: Sequence[int] | None = None,
                 reselect: bool = False, max_new_tokens: int = 16, filter_outliers: bool = True):
    """VHR (He et al. 2025) with the heads chosen from this input's own VHD: once at prefill and
    reused at every step (the reference, through generate() with its KV cache), or re-chosen before
    every step (``reselect=True``, the paper's text; a greedy loop without cache, two extra forwards
    per step). Returns (new token ids [T], the heads used at each step)."""
    if not math.isfinite(alpha) or alpha == 0:
        raise HeadscopeError(f"alpha must be a finite non-zero factor (VHR's default is 2.0); got {alpha}")
    batch = vision.encode(hm, [image], [prompt])
    layers = default_layers(hm.geometry.n_layers) if layers is None else list(layers)
    n = batch["input_ids"].shape[1]

    def choose(inputs) -> list[Head]:
        vhd, txt = head_divergence(hm, inputs)
        v = outlier_filter(vhd[0], txt[0]) if filter_outliers else vhd[0]
        return select_heads(HeadScores(v, method="vhd", params={"layers": layers}))

    heads = choose(batch)
    if not reselect:
        with intervene(hm, Edit("scale", heads, strength=alpha)):
            out = hm.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=vision.pad_id(hm))
        return out[0, n:], [heads] * (out.shape[1] - n)
    ids, used = batch["input_ids"], []
    eos = hm.tokenizer.eos_token_id if hm.tokenizer is not None else None
    for _ in range(max_new_tokens):
        inputs = dict(batch, input_ids=ids, attention_mask=torch.ones_like(ids))
        heads = heads if not used else choose(inputs)
        used.append(heads)
        with intervene(hm, Edit("scale", heads, strength=alpha)):
            token = hm.model(**inputs).logits[0, -1].argmax()
        ids = torch.cat([ids, token.view(1, 1)], dim=1)
        if eos is not None and int(token) == eos:
            break
    return ids[0, n:], used
