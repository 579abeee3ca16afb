"""Head-wise KV-cache compression at generation time (DuoAttention; HeadKV; RazorAttention's choice).

Rules and deviations: docs/METHODS.md, "Head-wise KV-cache compression (DuoAttention, HeadKV, RazorAttention)".

Two policies, each a real cache (memory is saved, not masked away):

- ``duo`` (Xiao et al., ICLR 2025, "DuoAttention"): each KV head is *full* (keeps every key and value)
  or *streaming* (keeps the first ``sink`` real tokens and the last ``recent`` ones, in a ring buffer
  of fixed size). Streaming heads see only their sinks and window in prefill too (DuoAttention's
  Lambda-shaped mask); a query at rank r sees key rank j iff j <= r and (j < sink or r - j < recent),
  the window counting the query itself.
- ``headkv`` (Fu et al., ICLR 2025, "HeadKV"): per-KV-head budgets, ``floor`` tokens each plus a
  shared pool split in proportion to the head's normalised score. Prefill is full attention; at its
  end each head keeps the tokens its observation window (the prompt's last ``window`` queries)
  attends to most (SnapKV, Li et al. 2024: summed attention, max-pooled with kernel 7 as HeadKV's
  code does; GQA: averaged over the group's query heads), the window itself always kept. Generated
  tokens are appended to every head.

The unit is the KV head. From query-head scores a KV group is chosen by ``rule``: ``any`` (walk the
query-head ranking, a group is full as soon as one of its query heads comes up; the default, as
DuoAttention's "a group is full if any head needs it"), ``mean`` or ``max`` of its heads' scores.

Attention runs through headscope's attention route (``HeadModel.edit_attention``): full heads over
their own keys with the model's mask, streaming heads over sinks + window. Ranks count real
tokens per row (left padding allowed), from each call's ``attention_mask``. It composes with the
output (z) and query edits of ``intervene``; other *attention-replacing* edits (VAR, attention
statistics) see the full heads' keys only and are refused together with it.
"""

from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from headscope.hf import loading
from headscope.hf.cache import Cache, CacheLayerMixin, DynamicCache

from headscope import organisms
from headscope.analyzers.classic import head_type_scores, repeated_random_tokens
from headscope.errors import HeadscopeError
from headscope.heads import same_layer_random_heads
from headscope.interventions import registry
from headscope.interventions.edits import Edit
from headscope.provenance import check_scores_for
from headscope.published import published_format, read_grid
from headscope.scores import HeadScores, check_ranking

POLICIES = ("duo", "headkv")
RULES = ("any", "mean", "max")
BLOCK = 256  # query rows per block of streaming prefill (bounds the mask to BLOCK x (sink + recent + BLOCK))


# ------------------------------------------------------------------------------- choosing heads
def kv_group_scores(scores: torch.Tensor, n_kv_heads: int, rule: str = "mean") -> torch.Tensor:
    """[L, H] query-head scores -> [L, H_kv] KV-head scores by ``mean`` or ``max`` over each group
    (a [L, H_kv] tensor is returned as is). NaN (unscored) heads count as -inf."""
    if rule not in ("mean", "max"):
        raise HeadscopeError(f"unknown KV-group rule {rule!r}; choose mean or max")
    n_layers, n_heads = scores.shape
    if n_heads == n_kv_heads:
        return scores.float()
    if n_heads % n_kv_heads:
        raise HeadscopeError(f"{n_heads} query heads do not split into {n_kv_heads} KV groups")
    grouped = torch.nan_to_num(scores.float(), nan=float("-inf")).view(n_layers, n_kv_heads, n_heads // n_kv_heads)
    return grouped.mean(-1) if rule == "mean" else grouped.amax(-1)


def n_full(share: float, n_layers: int, n_kv_heads: int) -> int:
    """How many KV heads a share of full heads is (rounded to the nearest)."""
    check_share(share)
    return int(round(share * n_layers * n_kv_heads))


def full_heads_from_scores(scores: torch.Tensor, n_kv_heads: int, share: float, rule: str = "any") -> torch.Tensor:
    """[L, H_kv] bool: the ``share`` of KV heads kept full, from [L, H] (or [L, H_kv]) scores."""
    if rule not in RULES:
        raise HeadscopeError(f"unknown KV-group rule {rule!r}; choose one of {', '.join(RULES)}")
    n_layers, n_heads = scores.shape
    k = n_full(share, n_layers, n_kv_heads)
    full = torch.zeros(n_layers, n_kv_heads, dtype=torch.bool)
    if rule == "any" and n_heads != n_kv_heads:
        group = n_heads // n_kv_heads
        flat = torch.nan_to_num(scores.float(), nan=float("-inf")).flatten()
        for i in sorted(range(flat.numel()), key=lambda i: (-flat[i].item(), i)):
            if int(full.sum()) >= k:
                break
            full[i // n_heads, (i % n_heads) // group] = True
        return full
    kv = kv_group_scores(scores, n_kv_heads, "mean" if rule == "any" else rule).flatten()
    order = sorted(range(kv.numel()), key=lambda i: (-kv[i].item(), i))[:k]
    full.view(-1)[order] = True
    return full


def random_full_heads(like: torch.Tensor, rng: random.Random, per_layer: bool = True) -> torch.Tensor:
    """Random full KV heads, the same count per layer as ``like`` ([L, H_kv] bool): the control.
    ``per_layer=False``: the same total count, drawn from all KV heads (with few KV heads per layer
    the per-layer draw can leave no choice: a layer whose heads are all chosen stays so)."""
    out = torch.zeros_like(like)
    if not per_layer:
        out.view(-1)[rng.sample(range(like.numel()), int(like.sum()))] = True
        return out
    chosen = [tuple(h) for h in torch.nonzero(like).tolist()]
    for layer, h in same_layer_random_heads(chosen, like.shape[1], rng, exclude_given=False):
        out[layer, h] = True
    return out


def razor_scores(hm, seed: int = 0):
    """RazorAttention's data-free choice (Tang et al. 2025): echo (duplicate-token) and induction
    scores on repeated random tokens; a head's score is the larger of the two (as [L, H] HeadScores)."""
    tokens = repeated_random_tokens(hm, seed=seed)
    echo = head_type_scores(hm, "duplicate-token", tokens).scores
    induction = head_type_scores(hm, "induction", tokens).scores
    return HeadScores(torch.maximum(echo, induction), "razor (max of echo, induction)", hm.name,
                      {"sequences": int(tokens.shape[0]), "length": int(tokens.shape[1]), "seed": seed})


def check_share(share: float) -> None:
    if not (isinstance(share, (int, float)) and 0.0 <= share <= 1.0):
        raise HeadscopeError(f"--full-share must lie in [0, 1] (a share of the KV heads); got {share}")


def check_window(sink: int, recent: int, context: int | None = None) -> None:
    """sink >= 0, recent >= 1, and sink + recent no longer than the context (when known)."""
    if sink < 0 or recent < 0:
        raise HeadscopeError(f"--sink and --recent must be >= 0; got sink {sink}, recent {recent}")
    if recent < 1:
        raise HeadscopeError("--recent must be >= 1: a streaming head's window holds at least the current token")
    if context is not None and sink + recent > context:
        raise HeadscopeError(f"the streaming window (sink {sink} + recent {recent} = {sink + recent} tokens) is longer "
                             f"than the context ({context} tokens): nothing would be compressed; lower --recent")


# ------------------------------------------------------------------------------- the cache
def _sdpa(q, k, v, mask, scaling):
    """q [B, Hq, n, d] over k, v [B, Hk, m, d] (Hq a multiple of Hk), bool mask [B, 1, n, m] or None
    (None with n > 1: causal, the queries being the last n positions)."""
    n, m = q.shape[-2], k.shape[-2]
    causal = mask is None and n > 1
    if causal and n != m:
        mask = torch.ones(n, m, dtype=torch.bool, device=q.device).tril(m - n)
        causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, is_causal=causal,
                                          enable_gqa=q.shape[1] != k.shape[1])


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class _Layer(CacheLayerMixin):
    """Common state: tokens seen (padded positions), the model's KV geometry."""

    is_sliding = False
    is_croppable = False

    def __init__(self, cache: "KVCompressedCache", n_kv_heads: int, n_heads: int):
        super().__init__()
        self.cache = cache
        self.n_kv, self.n_q = n_kv_heads, n_heads
        self.group = n_heads // n_kv_heads
        self.seen = 0

    def lazy_initialization(self, key_states, value_states) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.batch, self.head_dim = key_states.shape[0], key_states.shape[-1]
        self.is_initialized = True

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def q_heads(self, kv: torch.Tensor) -> torch.Tensor:
        """Query-head indices of the KV heads ``kv``, group by group."""
        return (kv[:, None] * self.group + torch.arange(self.group, device=kv.device)).flatten()

    def reorder_cache(self, beam_idx) -> None:
        raise HeadscopeError("head-wise KV compression does not support beam search; use greedy or sampling")


class DuoLayer(_Layer):
    """Full KV heads in a growing tensor; streaming KV heads in sink slots plus a ring buffer."""

    def __init__(self, cache, full: torch.Tensor, n_heads: int, sink: int, recent: int):
        super().__init__(cache, full.numel(), n_heads)
        self.full_kv = torch.nonzero(full).flatten()
        self.stream_kv = torch.nonzero(~full).flatten()
        self.full_q, self.stream_q = self.q_heads(self.full_kv), self.q_heads(self.stream_kv)
        self.sink, self.recent = sink, recent
        self.sink_keys = self.sink_values = self.ring_keys = self.ring_values = None
        self.sink_rank = self.ring_rank = None
        self.pending = None  # the streaming heads' new keys, values, ranks, until attention has used them

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        b, d, hs = self.batch, self.head_dim, len(self.stream_kv)
        kw = dict(device=self.device, dtype=self.dtype)
        self.keys = key_states.new_zeros(b, len(self.full_kv), 0, d)
        self.values = value_states.new_zeros(b, len(self.full_kv), 0, d)
        self.full_kv, self.stream_kv = self.full_kv.to(self.device), self.stream_kv.to(self.device)
        self.full_q, self.stream_q = self.full_q.to(self.device), self.stream_q.to(self.device)
        if hs:
            self.sink_keys, self.sink_values = torch.zeros(b, hs, self.sink, d, **kw), torch.zeros(b, hs, self.sink, d, **kw)
            self.ring_keys, self.ring_values = torch.zeros(b, hs, self.recent, d, **kw), torch.zeros(b, hs, self.recent, d, **kw)
            self.sink_rank = torch.full((b, self.sink), -1, dtype=torch.long, device=self.device)
            self.ring_rank = torch.full((b, self.recent), -1, dtype=torch.long, device=self.device)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        ranks = self.cache.ranks.to(self.device)  # [B, n] rank of each new token, -1 = padding
        if len(self.full_kv):
            self.keys = torch.cat([self.keys, key_states[:, self.full_kv]], dim=-2)
            self.values = torch.cat([self.values, value_states[:, self.full_kv]], dim=-2)
        if len(self.stream_kv):
            ks, vs = key_states[:, self.stream_kv], value_states[:, self.stream_kv]
            rows, cols = torch.nonzero((ranks >= 0) & (ranks < self.sink), as_tuple=True)
            if rows.numel():
                slots = ranks[rows, cols]
                self.sink_keys[rows, :, slots] = ks[rows, :, cols]
                self.sink_values[rows, :, slots] = vs[rows, :, cols]
                self.sink_rank[rows, slots] = slots
            self.pending = (ks, vs, ranks)
        self.seen += key_states.shape[-2]
        return self.keys, self.values

    def attend(self, query, mask, scaling) -> torch.Tensor:
        """Output [B, n, Hq, d] of this call's queries: full heads over all keys, streaming heads over
        sinks + window; then the new tokens enter the ring."""
        b, hq, n, d = query.shape
        out = query.new_empty(b, hq, n, d)
        if len(self.full_kv):
            out[:, self.full_q] = _sdpa(query[:, self.full_q], self.keys, self.values, mask, scaling)
        if len(self.stream_kv):
            ks, vs, ranks = self.pending
            qs = query[:, self.stream_q]
            old_k, old_v, old_r = self.ring_keys, self.ring_values, self.ring_rank
            for lo in range(0, n, BLOCK):
                hi = min(n, lo + BLOCK)
                start = max(0, lo - self.recent + 1)
                keys = torch.cat([self.sink_keys, old_k, ks[:, :, start:hi]], dim=-2)
                values = torch.cat([self.sink_values, old_v, vs[:, :, start:hi]], dim=-2)
                key_rank = torch.cat([self.sink_rank, old_r, ranks[:, start:hi]], dim=-1)[:, None, :]  # [B, 1, m]
                is_sink = torch.zeros(key_rank.shape[-1], dtype=torch.bool, device=query.device)
                is_sink[: self.sink] = True
                q_rank = ranks[:, lo:hi, None]  # [B, n, 1]
                allowed = (key_rank >= 0) & (key_rank <= q_rank) & (
                    is_sink | ((key_rank >= self.sink) & (q_rank - key_rank < self.recent)))
                allowed |= q_rank < 0  # padding queries: anything finite (their output is never used)
                out[:, self.stream_q, lo:hi] = _sdpa(qs[:, :, lo:hi], keys, values, allowed[:, None], scaling)
            self._to_ring(ks, vs, ranks)
            self.pending = None
        return out.transpose(1, 2)

    def _to_ring(self, ks, vs, ranks) -> None:
        n = ks.shape[-2]
        first = max(0, n - self.recent)
        slots = (torch.arange(first, n, device=ks.device) + self.seen - n) % self.recent
        self.ring_keys[:, :, slots] = ks[:, :, first:]
        self.ring_values[:, :, slots] = vs[:, :, first:]
        self.ring_rank[:, slots] = ranks[:, first:]

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.keys, self.values, self.sink_keys, self.sink_values, self.ring_keys,
                            self.ring_values, self.sink_rank, self.ring_rank) if t is not None]

    def held(self) -> dict:
        """Per KV head: how many token slots it holds ("full" heads: all seen)."""
        out = {}
        for h in self.full_kv.tolist():
            out[h] = {"kind": "full", "tokens": self.seen}
        for h in self.stream_kv.tolist():
            out[h] = {"kind": "streaming", "tokens": self.sink + self.recent}
        return out


class HeadKVLayer(_Layer):
    """Per-KV-head budgets: after a full-attention prefill, each head keeps its SnapKV-selected
    prompt tokens (ragged: one tensor per head) and appends every generated token."""

    def __init__(self, cache, budgets: torch.Tensor, n_heads: int, window: int, kernel: int):
        super().__init__(cache, budgets.numel(), n_heads)
        self.budgets = [int(b) for b in budgets]
        self.window, self.kernel = window, kernel
        self.head_keys: list[torch.Tensor] = []
        self.head_values: list[torch.Tensor] = []
        self.head_rank: list[torch.Tensor] = []
        self.prompt = None  # (keys, values, ranks) of the prompt until attention has chosen what stays

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        ranks = self.cache.ranks.to(self.device)
        n = key_states.shape[-2]
        if self.seen == 0:
            self.prompt = (key_states, value_states, ranks)
        else:
            if n != 1:
                raise HeadscopeError("the headkv policy compresses the prompt once; after it, feed one token per call")
            for h in range(self.n_kv):
                self.head_keys[h] = torch.cat([self.head_keys[h], key_states[:, h:h + 1]], dim=-2)
                self.head_values[h] = torch.cat([self.head_values[h], value_states[:, h:h + 1]], dim=-2)
                self.head_rank[h] = torch.cat([self.head_rank[h], ranks], dim=-1)
        self.seen += n
        return key_states, value_states

    def attend(self, query, mask, scaling) -> torch.Tensor:
        b, hq, n, d = query.shape
        if self.prompt is not None:  # prefill: full attention, then keep each head's budget
            keys, values, ranks = self.prompt
            out = _sdpa(query, keys, values, mask, scaling)
            self._select(query, keys, values, ranks, mask, scaling)
            self.prompt = None
            return out.transpose(1, 2)
        out = query.new_empty(b, hq, n, d)
        for h in range(self.n_kv):
            qh = query[:, h * self.group:(h + 1) * self.group]
            valid = (self.head_rank[h] >= 0)[:, None, None, :]
            out[:, h * self.group:(h + 1) * self.group] = _sdpa(qh, self.head_keys[h], self.head_values[h], valid, scaling)
        return out.transpose(1, 2)

    def _select(self, query, keys, values, ranks, mask, scaling) -> None:
        """SnapKV: attention of the last ``window`` queries, summed, max-pooled, top budget per head."""
        n = keys.shape[-2]
        w = min(self.window, n)
        logits = query[:, :, -w:].float() @ keys.float().repeat_interleave(self.group, 1).transpose(-1, -2) * scaling
        allowed = mask[..., -w:, :] if mask is not None and mask.dim() == 4 else torch.ones(
            w, n, dtype=torch.bool, device=keys.device).tril(n - w)[None, None]
        probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)  # [B, Hq, w, n]
        votes = probs[..., : n - w].sum(-2)  # [B, Hq, n - w]: attention onto the prefix
        votes = votes.view(votes.shape[0], self.n_kv, self.group, -1).mean(2)
        if votes.shape[-1] > 0:
            votes = F.max_pool1d(votes, self.kernel, stride=1, padding=self.kernel // 2)
        votes = votes.masked_fill(ranks[:, None, : n - w] < 0, float("-inf"))
        self.head_keys, self.head_values, self.head_rank = [], [], []
        for h, budget in enumerate(self.budgets):
            k = max(0, min(budget - w, n - w))
            idx = votes[:, h].topk(k, dim=-1).indices.sort(-1).values if k else votes.new_zeros(votes.shape[0], 0).long()
            idx = torch.cat([idx, torch.arange(n - w, n, device=keys.device).expand(idx.shape[0], w)], dim=-1)
            gather = idx[:, None, :, None].expand(-1, 1, -1, keys.shape[-1])
            self.head_keys.append(keys[:, h:h + 1].gather(2, gather).contiguous())
            self.head_values.append(values[:, h:h + 1].gather(2, gather).contiguous())
            rank = ranks.gather(1, idx)
            if k:  # a pad that slipped into a short row's top-k stays invalid
                rank[:, :k] = torch.where(votes[:, h].gather(1, idx[:, :k]).isfinite(), rank[:, :k], -1)
            self.head_rank.append(rank)

    def tensors(self) -> list[torch.Tensor]:
        return self.head_keys + self.head_values + self.head_rank

    def held(self) -> dict:
        return {h: {"kind": "budget", "tokens": int(self.head_keys[h].shape[-2]) if self.head_keys else 0}
                for h in range(self.n_kv)}


class KVCompressedCache(Cache):
    """A transformers ``Cache`` whose layers hold only what each KV head keeps.

    ``ranks`` ([B, n], set before each forward call by :func:`compress`'s input hook) is the rank
    of each new token among its row's real tokens (-1 = padding)."""

    def __init__(self, layers: list[_Layer]):
        super().__init__(layers=layers)
        self.ranks: torch.Tensor | None = None
        self.next_rank: torch.Tensor | None = None  # [B] real tokens seen per row

    def set_ranks(self, attention_mask: torch.Tensor | None, n_new: int, batch: int, device) -> None:
        if attention_mask is None:
            new = torch.ones(batch, n_new, dtype=torch.long, device=device)
        else:
            new = attention_mask[:, -n_new:].long().to(device)
        start = self.next_rank if self.next_rank is not None else torch.zeros(batch, dtype=torch.long, device=device)
        ranks = start[:, None] + new.cumsum(-1) - 1
        self.ranks = torch.where(new > 0, ranks, -1)
        self.next_rank = start + new.sum(-1)

    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds (keys, values, and the rank bookkeeping)."""
        return sum(_nbytes(*layer.tensors()) for layer in self.layers if layer.is_initialized)

    def full_nbytes(self) -> int:
        """Bytes a full cache (every head, every token seen) would hold for the same tokens."""
        total = 0
        for layer in self.layers:
            if layer.is_initialized:
                total += 2 * layer.batch * layer.n_kv * layer.seen * layer.head_dim * torch.empty(
                    0, dtype=layer.dtype).element_size()
        return total

    def held(self) -> list[dict]:
        """Per layer, per KV head: what kind of head it is and how many tokens it holds."""
        return [layer.held() for layer in self.layers]


def _n_kv(hm) -> tuple[int, int, int]:
    g = hm.geometry
    return g.n_layers, g.n_heads, g.n_kv_heads


def headkv_budgets(scores: torch.Tensor, budget: int, floor: int) -> torch.Tensor:
    """HeadKV budgets [L, H_kv]: ``floor`` each plus the pool (L * H_kv * (budget - floor) tokens)
    split in proportion to the normalised scores (negative / NaN scores count 0; all zero: equal)."""
    if floor < 0 or budget < floor:
        raise HeadscopeError(f"headkv needs 0 <= floor <= budget; got floor {floor}, budget {budget}")
    s = torch.nan_to_num(scores.float(), nan=0.0).clamp(min=0)
    s = s / s.sum() if s.sum() > 0 else torch.full_like(s, 1.0 / s.numel())
    pool = s.numel() * (budget - floor)
    share = s.flatten() * pool
    out = share.floor().long()
    rest = pool - int(out.sum())
    if rest > 0:
        out[torch.argsort(share - out, descending=True)[:rest]] += 1
    return (out + floor).view_as(scores)


def new_cache(hm, full: torch.Tensor | None = None, *, policy: str = "duo", sink: int = 4, recent: int = 64,
              budgets: torch.Tensor | None = None, window: int = 8, kernel: int = 7) -> KVCompressedCache:
    """An empty compressed cache for ``hm``: ``full`` [L, H_kv] bool (duo) or ``budgets`` [L, H_kv] (headkv)."""
    n_layers, n_heads, n_kv = _n_kv(hm)
    if policy == "duo":
        check_window(sink, recent)
        if full is None or tuple(full.shape) != (n_layers, n_kv):
            raise HeadscopeError(f"full heads must be a [{n_layers}, {n_kv}] bool tensor (layers x KV heads); got "
                                 f"{None if full is None else tuple(full.shape)}")
        layers = [DuoLayer(None, full[layer].bool(), n_heads, sink, recent) for layer in range(n_layers)]
    elif policy == "headkv":
        if budgets is None or tuple(budgets.shape) != (n_layers, n_kv):
            raise HeadscopeError(f"headkv budgets must be a [{n_layers}, {n_kv}] tensor (layers x KV heads)")
        layers = [HeadKVLayer(None, budgets[layer], n_heads, window, kernel) for layer in range(n_layers)]
    else:
        raise HeadscopeError(f"unknown KV-compression policy {policy!r}; choose one of {', '.join(POLICIES)}")
    cache = KVCompressedCache(layers)
    for layer in layers:
        layer.cache = cache
    return cache


class Compression:
    """What :func:`compress` yields: the cache of the latest generate / forward call, and the bytes
    held at the end of the longest call (``longest``: tokens, held and full bytes per sequence)."""

    def __init__(self, make):
        self._make = make
        self.cache: KVCompressedCache | None = None
        self.longest: dict | None = None

    def new_cache(self) -> KVCompressedCache:
        return self._make()

    def record(self) -> None:
        cache = self.cache
        if cache is None or not cache.layers[0].is_initialized:
            return
        seen, batch = cache.layers[0].seen, cache.layers[0].batch
        if self.longest is None or seen >= self.longest["tokens"]:
            self.longest = {"tokens": seen, "kv_bytes_held": cache.nbytes() // batch,
                            "kv_bytes_full": cache.full_nbytes() // batch}


_LATEST: list[Compression] = []  # the latest compression opened in this process (read by the CLI)


def latest() -> Compression | None:
    return _LATEST[-1] if _LATEST else None


@contextlib.contextmanager
def compress(hm, full: torch.Tensor | None = None, *, policy: str = "duo", sink: int = 4, recent: int = 64,
             budgets: torch.Tensor | None = None, window: int = 8, kernel: int = 7) -> Iterator[Compression]:
    """Run ``hm.model`` (forward and generate) with a head-wise compressed KV cache.

    Every forward call that arrives with no cache, or an empty one, gets a fresh
    :class:`KVCompressedCache` (so ``generate`` uses it throughout); a call passing a compressed
    cache keeps it. The yielded object's ``cache`` is the latest one (``cache.nbytes()``). The hooks
    go through HeadModel's hook table (removed on exit, also after an exception).
    """
    state = Compression(lambda: new_cache(hm, full, policy=policy, sink=sink, recent=recent, budgets=budgets,
                                          window=window, kernel=kernel))
    state.new_cache()  # checks the arguments before anything is hooked

    def pre_hook(module, args, kwargs):
        if getattr(hm, "_stats", None) is not None:
            raise HeadscopeError("attention statistics read every head's full keys; they cannot run on a compressed "
                                 "KV cache: close kv_compress (or the attention_stats block) first")
        if len(hm._hooks["attention_edit"]) > 1:  # e.g. VAR: only one edit can produce a layer's attention
            raise HeadscopeError("kv_compress computes every layer's attention over its own cache; another edit "
                                 "that replaces attention (VAR) cannot run with it: apply them in separate runs")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if not isinstance(cache, KVCompressedCache):
            if cache is not None and not (isinstance(cache, DynamicCache) and cache.get_seq_length() == 0):
                raise HeadscopeError("KV compression needs to own the cache: pass no cache (or its own, "
                                     "Compression.new_cache()), not a filled one")
            cache = state.new_cache()
        kwargs.pop("past_key_values", None)
        kwargs["cache"], kwargs["use_cache"] = cache, True
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs["inputs_embeds"]
        cache.set_ranks(kwargs.get("attention_mask"), ids.shape[1], ids.shape[0], ids.device)
        state.cache = cache
        return args, kwargs

    def edit(layer, module, query, key, value, mask, scaling, **kwargs):
        cache = state.cache
        if cache is None:
            return None
        if mask is not None and mask.dtype != torch.bool:
            raise HeadscopeError("KV compression needs a boolean attention mask (the sdpa mask)")
        return cache.layers[getattr(module, "layer_idx", layer)].attend(query, mask, scaling)

    _LATEST[:] = [state]
    with hm.hook_module(hm.model, pre_hook, pre=True, with_kwargs=True), \
            hm.hook_module(hm.model, lambda *a: state.record()), hm.edit_attention(edit):
        yield state


# ------------------------------------------------------------------------------- as an Edit kind
DEFAULT_SHARE = 0.25  # --full-share: DuoAttention's deployments keep about a quarter of heads full
HEADKV_FLOOR = 8  # HeadKV's per-head floor: SnapKV's observation window
RAZOR = "razor"  # --kv-compress razor: RazorAttention's data-free choice


def _integer(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise HeadscopeError(f"kv_compress option {name} must be an integer; got {value!r}")


@dataclass(frozen=True)
class KVCompressOptions:
    """A ``kv_compress`` edit's options, ranges checked here (before any model loads on the command line).

    ``full`` [L][H_kv] 0/1 (duo) or ``budgets`` [L][H_kv] tokens (headkv); ``share`` and ``rule``
    record how the full KV heads were chosen from a ranking (``--full-share``, ``--kv-rule``)."""

    policy: str = "duo"
    full: list | None = None
    budgets: list | None = None
    sink: int = 4
    recent: int = 64
    window: int = 8
    kernel: int = 7
    share: float | None = None
    rule: str = "any"

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise HeadscopeError(f"unknown KV-compression policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if self.rule not in RULES:
            raise HeadscopeError(f"unknown KV-group rule {self.rule!r}; choose one of {', '.join(RULES)}")
        if self.share is not None:
            if isinstance(self.share, bool) or not isinstance(self.share, (int, float)) or not math.isfinite(self.share):
                raise HeadscopeError(f"--full-share must lie in [0, 1] (a share of the KV heads); got {self.share!r}")
            check_share(self.share)
        for name in ("sink", "recent", "window", "kernel"):
            _integer(name, getattr(self, name))
        check_window(self.sink, self.recent)
        if self.window < 1 or self.kernel < 1:
            raise HeadscopeError(f"kv_compress options window and kernel must be >= 1; got {self.window}, {self.kernel}")


def check(edit) -> None:
    """Rules of a ``kv_compress`` edit beyond its options' ranges (called by Edit)."""
    if edit.heads:
        raise HeadscopeError("a kv_compress edit names its KV heads in options['full'], not in heads")
    need = "full" if edit.config.policy == "duo" else "budgets"
    if getattr(edit.config, need) is None:
        raise HeadscopeError(f"a {edit.config.policy} kv_compress edit needs options[{need!r}] ([layers][KV heads])")


def kv_edit(full: torch.Tensor | None = None, budgets: torch.Tensor | None = None, **options) -> Edit:
    """A ``kv_compress`` Edit: duo with ``full`` [L, H_kv] bool, or headkv with ``budgets`` [L, H_kv]."""
    if full is not None:
        options.update(policy=options.get("policy", "duo"), full=full.int().tolist())
    if budgets is not None:
        options.update(policy="headkv", budgets=budgets.long().tolist())
    return Edit("kv_compress", [], options=options)


@contextlib.contextmanager
def apply(hm, edit, state=None, prepared=None) -> Iterator[Compression]:
    """Install the compressed cache for the block's duration (used by ``intervene``)."""
    opts = edit.config
    full = torch.tensor(opts.full, dtype=torch.bool) if opts.full is not None else None
    budgets = torch.tensor(opts.budgets, dtype=torch.long) if opts.budgets is not None else None
    with compress(hm, full, policy=opts.policy, sink=opts.sink, recent=opts.recent, budgets=budgets,
                  window=opts.window, kernel=opts.kernel) as run:
        yield run


# ------------------------------------------------------------------------------- command line
def _arguments(parser) -> None:
    parser.add_argument("--full-share", type=float, default=DEFAULT_SHARE,
                        help=f"with --kv-compress: share of KV heads kept full [{DEFAULT_SHARE}]")
    parser.add_argument("--sink", type=int, default=KVCompressOptions.sink,
                        help=f"with --kv-compress: sink tokens of streaming heads [{KVCompressOptions.sink}]")
    parser.add_argument("--recent", type=int, default=KVCompressOptions.recent,
                        help=f"with --kv-compress: recent window of streaming heads [{KVCompressOptions.recent}]")
    parser.add_argument("--policy", choices=POLICIES, default=KVCompressOptions.policy,
                        help="with --kv-compress: duo (full / streaming heads) or headkv (per-head budgets)")
    parser.add_argument("--kv-rule", choices=RULES, default=KVCompressOptions.rule,
                        help="with --kv-compress: a KV group is full if any of its query heads is chosen, or by "
                             "the mean / max of their scores")


def _options(args) -> KVCompressOptions:
    """The command line's values as options (each range checked by the dataclass)."""
    return KVCompressOptions(policy=args.policy, sink=args.sink, recent=args.recent, share=args.full_share,
                             rule=args.kv_rule)


def _longest_context(args) -> int | None:
    lengths = getattr(args, "lengths", None)
    if lengths:
        return max(lengths)
    if getattr(args, "task", None) == "needle":  # an organism carries its own needle grid
        grid = organisms.organism_info(args.model or organisms.DEFAULT_MODEL).get("needle", {})
        return max(grid["lengths"]) if grid.get("lengths") else None
    prompt = getattr(args, "prompt", None)
    if prompt is not None and getattr(args, "image", None) is None:  # generate: the prompt's own length
        name = getattr(args, "model", None) or organisms.DEFAULT_MODEL
        tokenizer = loading.load_tokenizer(str(organisms.organism_path(name) or name))
        if tokenizer is not None:  # the tokenizer alone, before any model loads
            return len(tokenizer(prompt)["input_ids"])
    return None


def _check(args) -> None:
    """Options, window against the context, and the ranking file, before any model loads."""
    opts = _options(args)
    check_window(opts.sink, opts.recent, _longest_context(args))
    if args.kv_compress != RAZOR:
        check_ranking(args.kv_compress, None)


def _scores(args, hm) -> torch.Tensor:
    g = hm.geometry
    if args.kv_compress == RAZOR:
        return razor_scores(hm, seed=getattr(args, "seed", 0)).scores
    if published_format(args.kv_compress):  # a DuoAttention file is read at the KV-head level
        scores, method, model, params = read_grid(args.kv_compress, (g.n_layers, g.n_heads), g.n_kv_heads, kv_level=True)
        check_scores_for(hm, HeadScores(scores, method, model, params), f"ranking {args.kv_compress}",
                         getattr(args, "force", False))
        return scores
    return HeadScores.from_csv(args.kv_compress, grid=(g.n_layers, g.n_heads), model=hm,
                               force=getattr(args, "force", False)).scores


def _shuffled(n: int, rng: random.Random) -> list[int]:
    order = list(range(n))
    rng.shuffle(order)
    return order


def _build(args, hm, rng: random.Random | None = None, heads=None) -> list[Edit]:
    """``--kv-compress RANKING|razor``: the full KV heads (duo) or budgets (headkv) of this ranking;
    ``--random-heads``: random full heads, the same count per layer (headkv: the scores shuffled)."""
    opts = _options(args)
    g = hm.geometry
    scores = _scores(args, hm)
    random_heads = getattr(args, "random_heads", False)
    if opts.policy == "headkv":
        kv = scores if scores.shape[1] == g.n_kv_heads else kv_group_scores(
            scores, g.n_kv_heads, "max" if opts.rule == "max" else "mean")
        if random_heads:
            flat = kv.flatten()
            kv = flat[_shuffled(flat.numel(), rng or random.Random(args.seed))].view_as(kv)
        budget = opts.sink + opts.recent
        return [kv_edit(budgets=headkv_budgets(kv, budget, min(HEADKV_FLOOR, budget)), rule=opts.rule)]
    full = full_heads_from_scores(scores, g.n_kv_heads, opts.share, opts.rule)
    if random_heads:
        full = random_full_heads(full, rng or random.Random(args.seed))
    return [kv_edit(full, sink=opts.sink, recent=opts.recent, share=opts.share, rule=opts.rule)]


def _report(args) -> list[str]:
    """The kv_bytes lines of the latest compression: per sequence, every tensor of the cache, at the
    end of the longest call (eval prints them before the metric)."""
    state = latest()
    if state is None or state.longest is None:
        return []
    return [f"kv_bytes_held: {state.longest['kv_bytes_held']}", f"kv_bytes_full: {state.longest['kv_bytes_full']}"]


KIND = registry.register(registry.EditKind(
    "kv_compress", apply, doc=__doc__, options=KVCompressOptions, label="kv_compress", check=check, needs_heads=False,
    flags=(registry.CliFlag(
        "kv-compress", "compress the KV cache head-wise: full KV heads from this ranking (headscope CSV, "
        "DuoAttention folder/TSV, Retrieval_Head JSON, QRHead YAML) or 'razor' (data-free); --full-share, --sink, "
        "--recent, --policy duo|headkv, --kv-rule any|mean|max", _build, takes="file", metavar="RANKING",
        arguments=_arguments, check=_check, probe=False, random=True, report=_report),),
))
