"""DeCoRe: Decoding by Contrasting Retrieval Heads (Gema et al. 2024, arXiv:2410.18860).

The base model is contrasted with a "masked" copy of itself whose retrieval heads get uniform
attention (query = 0). As in the reference code: the prompt minus its last token is prefilled
once, unmasked, and that cache is copied into a base and a masked cache (the masked model's prompt
cache is NOT masked; ``mask_prompt_cache=True`` masks it too). From the last prompt token on, both
models run one token per step. Each step::

    alpha = entropy(softmax(base_logits))            # nats [reference]; or a fixed number [0.5]
    next  = (1 + alpha) * logsoftmax(base) - alpha * logsoftmax(masked)

then greedy argmax (sampling as an option). The reference's generate() contrasts raw logits; the
per-distribution log-normaliser is a constant shift, so argmax and softmax-sampling are the same.
Options from the reference: ``scale_alpha`` (divide the entropy by log V), ``alpha_cap``.
Control: the same number of random heads (:func:`random_heads`).
"""

from __future__ import annotations

import contextlib
import copy
import random
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from headscope.errors import HeadscopeError
from headscope.hf.inputs import left_padded_positions
from headscope.interventions.edits import Edit, intervene

Head = tuple[int, int]


@dataclass
class DecoreOutput:
    sequences: torch.Tensor  # [B, prompt + new]
    alphas: torch.Tensor  # [B, steps] the contrast weight used at each step
    scores: torch.Tensor  # [B, steps, V] the contrasted log-scores


def entropy_alpha(base_logits: torch.Tensor, scale_alpha: bool = False, alpha_cap: float | None = None) -> torch.Tensor:
    """alpha = entropy of softmax(base logits) in nats ([B]); optionally / log V, optionally capped."""
    probs = base_logits.float().softmax(-1)
    alpha = -(probs * torch.log(probs + 1e-12)).sum(-1)
    if scale_alpha:
        alpha = alpha / torch.log(torch.tensor(float(base_logits.shape[-1])))
    if alpha_cap is not None:
        alpha = alpha.clamp(max=alpha_cap)
    return alpha


def contrast(base_logits: torch.Tensor, masked_logits: torch.Tensor, alpha: torch.Tensor | float) -> torch.Tensor:
    """(1 + alpha) * logsoftmax(base) - alpha * logsoftmax(masked), alpha per row."""
    alpha = torch.as_tensor(alpha, dtype=torch.float32, device=base_logits.device)
    alpha = alpha.view(-1, 1) if alpha.dim() else alpha
    return (1 + alpha) * base_logits.float().log_softmax(-1) - alpha * masked_logits.float().log_softmax(-1)


def random_heads(hm, k: int, *, exclude: Iterable[Head] = (), seed: int = 0) -> list[Head]:
    """k distinct random heads (not in ``exclude``): DeCoRe's random-head control."""
    excluded = set(hm.check_heads(exclude))
    pool = [h for h in hm.all_heads() if h not in excluded]
    if not 0 < k <= len(pool):
        raise HeadscopeError(f"need 1 <= k <= {len(pool)} random heads (heads available); got {k}")
    return sorted(random.Random(seed).sample(pool, k))


@torch.no_grad()
def decore_generate(
    hm,
    input_ids: torch.Tensor,
    heads: Sequence[Head],
    *,
    max_new_tokens: int = 16,
    alpha: float | None = None,
    scale_alpha: bool = False,
    alpha_cap: float | None = None,
    mask_prompt_cache: bool = False,
    do_sample: bool = False,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    attention_mask: torch.Tensor | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> DecoreOutput:
    """Generate with DeCoRe. ``alpha=None``: entropy-scaled contrast (the reference's DeCoRe-entropy);
    a number: fixed alpha (DeCoRe-static, [0.5] in the paper). ``heads``: the retrieval heads to mask
    (or random heads for the control). Left-padded batches: give ``attention_mask``."""
    heads = hm.check_heads(heads)
    ids = torch.as_tensor(input_ids, device=hm.device)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.shape[1] < 1 or max_new_tokens < 1:
        raise HeadscopeError("DeCoRe needs a non-empty prompt and max_new_tokens >= 1")
    if temperature <= 0:
        raise HeadscopeError(f"temperature must be > 0; got {temperature}")
    mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask, device=ids.device).long()
    if mask.shape != ids.shape:
        raise HeadscopeError(f"attention_mask has shape {tuple(mask.shape)}; input_ids {tuple(ids.shape)}")
    if eos_token_id is None:
        eos_token_id = getattr(hm.model.generation_config, "eos_token_id", None)
        if isinstance(eos_token_id, list):
            eos_token_id = eos_token_id[0] if eos_token_id else None
    if pad_token_id is None:
        pad_token_id = eos_token_id if eos_token_id is not None else 0
    masking = [Edit("uniform", heads)] if heads else []
    model = hm.model

    def forward(tokens, attn, cache, masked: bool):
        position_ids = left_padded_positions(attn)[:, -tokens.shape[1]:]
        with _masked(hm, masking if masked else []):
            out = model(input_ids=tokens, attention_mask=attn, position_ids=position_ids,
                        cache=cache, use_cache=True)
        return out.logits[:, -1], out.cache

    base_cache = masked_cache = None
    if ids.shape[1] > 1:  # prefill all but the last prompt token, once, unmasked (reference)
        _, base_cache = forward(ids[:, :-1], mask[:, :-1], None, False)
        if mask_prompt_cache:
            _, masked_cache = forward(ids[:, :-1], mask[:, :-1], None, True)
        else:
            masked_cache = copy.deepcopy(base_cache)
    seq, attn, current = ids, mask, ids[:, -1:]
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    alphas, scores = [], []
    for _ in range(max_new_tokens):
        base_logits, base_cache = forward(current, attn, base_cache, False)
        masked_logits, masked_cache = forward(current, attn, masked_cache, True)
        a = entropy_alpha(base_logits, scale_alpha, alpha_cap) if alpha is None else torch.full(
            (ids.shape[0],), float(alpha), device=ids.device)
        logits = contrast(base_logits, masked_logits, a)
        if do_sample:
            nxt = torch.multinomial((logits / temperature).softmax(-1), 1, generator=generator).squeeze(1)
        else:
            nxt = logits.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
        alphas.append(a)
        scores.append(logits)
        seq = torch.cat([seq, nxt[:, None]], 1)
        attn = torch.cat([attn, torch.ones_like(nxt[:, None])], 1)
        current = nxt[:, None]
        if eos_token_id is not None:
            done |= nxt == eos_token_id
            if done.all():
                break
    return DecoreOutput(seq, torch.stack(alphas, 1), torch.stack(scores, 1))


def _masked(hm, edits):
    """``intervene`` for the masked model's calls; a no-op context for the base model's."""
    return intervene(hm, edits) if edits else contextlib.nullcontext()
