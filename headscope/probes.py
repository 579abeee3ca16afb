"""What HeadModel's probes record: attention statistics per layer and call, and per-head z.

``HeadModel.attention_stats`` opens a :class:`StatsRequest` (checked by :func:`stats_request`); while
it is open, the attention handler of each requested layer calls :func:`record_attention`, which runs
headscope_kernels' streamed pass (no [H, N, N] pattern) and appends the statistics to the request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Iterable, Sequence

import torch

from headscope.errors import HeadscopeError
from headscope.hf import attention
from headscope_kernels import attention_received, attention_with_stats

STATISTICS = ("top1", "group_mass", "lse", "entropy", "received", "match_mass")


@dataclass
class StatsRequest:
    """What the attention function records while an ``attention_stats`` block is open."""

    outputs: tuple[str, ...]
    layers: frozenset[int]
    key_groups: torch.Tensor | None  # [B, N] group id per absolute key position, -1 = none
    num_groups: int
    query_rows: tuple[int, int] | None  # absolute query positions [start, stop); None = all
    match_ids: tuple[torch.Tensor, torch.Tensor] | None = None  # key ids, query ids: [C, B, N] each
    calls: dict[int, list[tuple[int, object]]] = field(default_factory=dict)  # layer -> [(abs row 0, stats)]


class StatsRecording:
    """Attention statistics per layer and forward call (a decode loop makes one call per step)."""

    def __init__(self, request: StatsRequest, n_layers: int):
        self._request = request
        self.layers = sorted(request.layers)
        self._n_layers = n_layers

    @property
    def n_calls(self) -> int:
        return min((len(self._request.calls.get(layer, [])) for layer in self.layers), default=0)

    def call(self, index: int = -1) -> dict[int, object]:
        """``{layer: AttentionStats}`` of one forward call (default: the last)."""
        return {layer: self._request.calls[layer][index][1] for layer in self.layers}

    def row_start(self, index: int = -1) -> int:
        """Absolute position of the first recorded query row in that call."""
        return self._request.calls[self.layers[0]][index][0]

    def stacked(self, name: str, index: int = -1) -> torch.Tensor:
        """One statistic of one call, stacked over layers: [L, B, H, rows, ...]."""
        return torch.stack([getattr(self._request.calls[layer][index][1], name) for layer in self.layers])

    def top1_index(self, index: int = -1) -> torch.Tensor:
        return self.stacked("top1_index", index)

    def group_mass(self, index: int = -1) -> torch.Tensor:
        return self.stacked("group_mass", index)


class ZCapture:
    """Per-head outputs z ([B, positions, H, d_head]) per layer, from the last forward call."""

    def __init__(self, layers: Iterable[int], positions):
        self.layers = sorted(layers)
        self.positions = positions
        self.z: dict[int, torch.Tensor] = {}

    def take(self, layer: int, zh: torch.Tensor) -> None:
        """Keep the captured positions of one layer's z [B, S, H, d] (detached)."""
        if layer in self.layers:
            self.z[layer] = select_positions(zh, self.positions).detach()


def stats_request(outputs: Sequence[str], layers: Iterable[int] | None, key_groups, num_groups: int,
                  query_rows, match_ids, n_layers: int) -> StatsRequest:
    """A checked request (see ``HeadModel.attention_stats`` for the arguments)."""
    layers = set(range(n_layers)) if layers is None else {int(x) for x in layers}
    if not layers <= set(range(n_layers)):
        raise HeadscopeError(f"layers must lie in 0..{n_layers - 1}; got {sorted(layers)}")
    unknown = [o for o in outputs if o not in STATISTICS]
    if unknown:
        raise HeadscopeError(f"unknown statistic(s) {unknown}; choose from {list(STATISTICS)}")
    if "match_mass" in outputs and match_ids is None:
        raise HeadscopeError("match_mass needs match_ids=(key ids, query ids), each [C, B, N]")
    if match_ids is not None:
        match_ids = tuple(_as_channels(torch.as_tensor(ids, dtype=torch.long)) for ids in match_ids)
    if "group_mass" in outputs and (key_groups is None or num_groups < 1):
        raise HeadscopeError("group_mass needs key_groups (a group id per key) and num_groups >= 1")
    if key_groups is not None:
        key_groups = torch.as_tensor(key_groups, dtype=torch.long)
        if key_groups.dim() == 1:
            key_groups = key_groups.unsqueeze(0)
    return StatsRequest(tuple(outputs), frozenset(layers), key_groups, num_groups, query_rows, match_ids)


def check_recorded(request: StatsRequest, model_name: str) -> None:
    """Every requested layer called the attention function (when any did)."""
    silent = [layer for layer in request.layers if layer not in request.calls]
    if request.calls and silent:
        raise HeadscopeError(
            f"layers {sorted(silent)} of {model_name} did not call transformers' attention "
            "registry, so their attention can't be hooked"
        )


def record_attention(request: StatsRequest, layer: int, q_offset: int, module, query, key, value, mask, scaling,
                     **kwargs):
    """The layer's attention output [B, q, H, d], with its statistics appended to ``request``.

    ``q_offset``: absolute position of the call's first query row."""
    n_q, n_k = query.shape[2], key.shape[2]
    common = attention.kernel_arguments(module, query, mask, scaling, kwargs)  # causal, sliding_window, softcap
    scale, bias = common.pop("scaling"), common.pop("attn_mask")  # bias: the mask plus any position bias
    lo, hi = 0, n_q
    if request.query_rows is not None:
        lo = min(max(request.query_rows[0] - q_offset, 0), n_q)
        hi = min(max(request.query_rows[1] - q_offset, lo), n_q)
    if hi <= lo:  # none of this call's rows were asked for
        return attention.stock_attention(module, query, key, value, mask, scaling, **kwargs)
    groups = None
    if request.key_groups is not None:
        groups = torch.full((query.shape[0], n_k), -1, dtype=torch.long, device=query.device)
        given = request.key_groups.to(query.device)[:, :n_k]
        groups[:, : given.shape[1]] = given
    extra = {}
    if request.match_ids is not None:
        key_ids, query_ids = (ids.to(query.device) for ids in request.match_ids)
        extra["key_match_ids"] = _fit(key_ids, n_k)
        extra["query_match_ids"] = _fit(query_ids[..., q_offset + lo :], hi - lo)
    sub_bias = bias[:, :, lo:hi] if bias is not None and bias.shape[2] == n_q else bias
    kernel_outputs = tuple(o for o in request.outputs if o != "received")
    if lo == 0 and hi == n_q:
        stats = attention_with_stats(
            query, key, value, scale, q_offset=q_offset, attn_mask=bias, key_groups=groups,
            num_groups=request.num_groups, outputs=("out", "lse") + kernel_outputs, **common, **extra,
        )
        out = stats.out.transpose(1, 2).contiguous()
    else:
        out = attention.stock_attention(module, query, key, value, mask, scaling, **kwargs)
        stats = attention_with_stats(
            query[:, :, lo:hi], key, value, scale, q_offset=q_offset + lo, attn_mask=sub_bias,
            key_groups=groups, num_groups=request.num_groups, outputs=("lse",) + kernel_outputs,
            **common, **extra,
        )
    record = SimpleNamespace(**{k: v for k, v in vars(stats).items() if k != "out"})
    if "received" in request.outputs:
        record.received = attention_received(
            query[:, :, lo:hi], key, scale, stats.lse, q_offset=q_offset + lo, attn_mask=sub_bias, **common
        )
    request.calls.setdefault(layer, []).append((q_offset + lo, record))
    return out


def _as_channels(ids: torch.Tensor) -> torch.Tensor:
    """Match ids as [C, B, N] from [N], [B, N] or [C, B, N]."""
    while ids.dim() < 3:
        ids = ids.unsqueeze(0)
    return ids


def _fit(ids: torch.Tensor, n: int) -> torch.Tensor:
    """The first n positions of [..., N] ids, padded with -1 (never matches) if N < n."""
    if ids.shape[-1] >= n:
        return ids[..., :n].contiguous()
    pad = torch.full((*ids.shape[:-1], n - ids.shape[-1]), -1, dtype=ids.dtype, device=ids.device)
    return torch.cat([ids, pad], dim=-1)


def select_positions(z: torch.Tensor, positions) -> torch.Tensor:
    """z [B, S, ...] at ``positions``: "all", "last", an int, a slice or a list of ints."""
    if isinstance(positions, str):
        if positions == "all":
            return z
        if positions == "last":
            return z[:, -1:]
        raise HeadscopeError(f"positions must be 'all', 'last', an int, a slice or a list; got {positions!r}")
    if isinstance(positions, int):
        return z[:, positions : positions + 1] if positions != -1 else z[:, -1:]
    if isinstance(positions, slice):
        return z[:, positions]
    return z[:, list(positions)]
