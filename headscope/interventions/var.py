"""VAR, Visual Attention Redistribution (Kang et al. 2025, "See What You Are Told: Visual Attention
Sink in Large Multimodal Models"); see docs/METHODS.md, "VAR".

An edit of kind ``"var"`` (``Edit("var", heads=(), strength=p, options={...})``; no heads = all
heads) does, in every layer from ``first_layer`` [2] on:

1. Sinks, fixed at prefill: token j is a sink when max over the model's massive dims of
   phi(h_j) = |h_j / sqrt(mean(h_j^2) + 1e-6)| > tau [20], h_j the layer's residual input. The
   dims come from the massive-activation analysis of that model (:func:`var_edit`), never a fixed
   list. Image tokens that pass are visual sinks; text tokens that pass are text sinks, and the
   first real token (BOS) counts as a text sink [``first_token_sink``: True] unless it is an image
   token.
2. Image-centric (head, query) rows: queries after the image at prefill and the new token at each
   decode step, whose attention share on visual sinks within the image is <= rho [0.5] and whose
   total image attention is >= ``min_image_mass`` [0.2].
3. On those rows every sink's weight is multiplied by p [0.6]; the freed mass goes to the non-sink
   image tokens in proportion to their weights (rows still sum to 1). A row with no non-sink image
   token is left unchanged (the reference divides by zero there).

The redistribution runs in the fused kernel (``reweight=(sinks, non-sink image, p)``), only on the
rows after the image: no eager attention, no [H, N, N] pattern. Unlike the reference it also runs
in the last layer (its exclusion never runs there) and handles batches with left padding.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch

from headscope import hooks, vision
from headscope.errors import HeadscopeError

DEFAULT_STRENGTH = 0.6  # p
DEFAULTS = {"dims": [], "tau": 20.0, "rho": 0.5, "min_image_mass": 0.2, "first_layer": 2, "layers": None,
            "first_token_sink": True}


def check(edit) -> None:
    """Validate a var edit's options and strength (called by Edit)."""
    unknown = set(edit.options) - set(DEFAULTS)
    if unknown:
        raise HeadscopeError(f"unknown VAR option(s) {sorted(unknown)}; choose from {sorted(DEFAULTS)}")
    opts = {**DEFAULTS, **edit.options}
    p = edit.strength
    if isinstance(p, torch.Tensor) or isinstance(p, list) or not (0.0 <= float(p) <= 1.0):
        raise HeadscopeError(f"VAR's p (strength) must be one number in [0, 1]; got {p!r}")
    for name in ("tau", "rho", "min_image_mass"):
        if not isinstance(opts[name], (int, float)) or not math.isfinite(opts[name]):
            raise HeadscopeError(f"VAR option {name} must be a finite number; got {opts[name]!r}")
    if not all(isinstance(d, int) for d in opts["dims"]):
        raise HeadscopeError(f"VAR dims must be hidden-dimension indices (ints); got {opts['dims']!r}")
    if edit.positions != "all":
        raise HeadscopeError("VAR chooses its own rows (queries after the image); leave positions='all'")


@torch.no_grad()
def massive_dims(hm, batch: dict, threshold: float = 100.0, ratio: float = 1000.0) -> list[int]:
    """Hidden dims carrying massive activations (Sun et al. 2024) in the layers' residual inputs for
    these model inputs: the sink analyzer's criterion, on an image-text batch."""
    from headscope.analyzers.sinks import massive_mask

    out = hm.model(**vision.with_positions(hm, batch), output_hidden_states=True)
    mask = batch.get("attention_mask")
    dims: set[int] = set()
    for h in out.hidden_states[:-1]:
        for b in range(h.shape[0]):
            rows = h[b] if mask is None else h[b][mask[b].bool()]
            dims.update(massive_mask(rows.float(), threshold, ratio).nonzero()[:, 1].tolist())
    return sorted(dims)


def var_edit(hm, batch: dict, p: float = DEFAULT_STRENGTH, *, threshold: float = 100.0, ratio: float = 1000.0,
             heads=(), scope: str = "both", **options):
    """A VAR edit for this model, its massive dims found on ``batch`` (model inputs with images)."""
    from headscope.interventions.edits import Edit

    vision.require_vision(hm, "VAR")
    dims = massive_dims(hm, batch, threshold, ratio)
    return Edit("var", list(heads), strength=p, scope=scope, options={"dims": dims, **options})


class _Run:
    """State of one VAR block: image positions and per-layer sinks of the latest prefill."""

    def __init__(self, hm, edit):
        self.hm = hm
        self.edit = edit
        self.opts = {**DEFAULTS, **edit.options}
        self.p = float(edit.strength)
        g = hm.geometry
        chosen = self.opts["layers"]
        self.layers = set(range(int(self.opts["first_layer"]), g.n_layers) if chosen is None else chosen)
        heads = torch.ones(g.n_layers, g.n_heads, dtype=torch.bool)
        if edit.heads:
            heads[:] = False
            for layer, head in edit.heads:
                heads[layer, head] = True
        self.heads = heads
        self.token = vision.require_vision(hm, "VAR")
        self.image = self.real = None
        self.sinks: dict[int, torch.Tensor] = {}
        self.rows_seen = self.rows_edited = 0

    # ------------------------------------------------------------------ prefill bookkeeping
    def see_inputs(self, kwargs: dict) -> None:
        ids = kwargs.get("input_ids")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers 5.2x names it "cache"
        cached = cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0
        if cached:
            return
        if ids is None:
            raise HeadscopeError("VAR needs input_ids (to find the image tokens); the model was called with "
                                 "inputs_embeds only")
        self.image = ids == self.token
        mask = kwargs.get("attention_mask")
        self.real = torch.ones_like(self.image) if mask is None or mask.dim() != 2 else mask.bool()
        self.sinks = {}

    def see_residual(self, layer: int, hidden: torch.Tensor) -> None:
        if layer not in self.layers or self.image is None or hidden.shape[1] != self.image.shape[1]:
            return
        from headscope.analyzers.sinks import sink_scores

        dims = self.opts["dims"]
        sinks = torch.zeros_like(self.image)
        if dims:
            sinks = sink_scores(hidden, dims) > self.opts["tau"]
        if self.opts["first_token_sink"]:  # the first real token (BOS), unless the prompt starts with the image
            first = self.real.long().argmax(1)
            rows = torch.arange(sinks.shape[0], device=sinks.device)
            sinks[rows, first] |= ~self.image[rows, first]
        self.sinks[layer] = sinks & self.real

    # ------------------------------------------------------------------ the attention edit
    def attention(self, layer, module, query, key, value, mask, scaling, **kwargs):
        if layer not in self.sinks:
            return None
        from headscope_kernels import attention_with_stats

        n_q, n_k = query.shape[2], key.shape[2]
        q_offset = n_k - n_q
        if (self.edit.scope == "prefill" and q_offset > 0) or (self.edit.scope == "decode" and q_offset == 0):
            return None
        dev = query.device
        image = _pad(self.image, n_k).to(dev)
        sinks = _pad(self.sinks[layer], n_k).to(dev)
        pos = torch.arange(n_k, device=dev)
        last_image = torch.where(image, pos, torch.full_like(pos, -1)).amax(1)  # [B]
        if not bool((last_image >= 0).any()):
            return None
        lo = int(last_image[last_image >= 0].min()) + 1 - q_offset if q_offset == 0 else 0
        if lo >= n_q:
            return None
        rows = q_offset + lo + torch.arange(n_q - lo, device=dev)  # absolute query positions
        after = (rows.view(1, -1) > last_image.view(-1, 1)) & (last_image.view(-1, 1) >= 0)  # [B, rows]
        groups = torch.where(sinks, 0, torch.where(image, 1, -1)).long()
        scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
        sub_mask = mask[:, :, lo:] if mask is not None and mask.dim() == 4 and mask.shape[2] == n_q else mask
        causal = mask is None and bool(getattr(module, "is_causal", False))
        q_rows = query[:, :, lo:]
        stats = attention_with_stats(
            q_rows, key, value, scaling, q_offset=q_offset + lo, attn_mask=sub_mask, causal=causal,
            sliding_window=kwargs.get("sliding_window"), key_groups=groups, num_groups=2,
            outputs=("out", "group_mass", "lse"), reweight=(0, 1, self.p))
        visual_sink_mass = _mass_on(q_rows, key, scaling, stats.lse, sinks & image, rows)
        image_mass = visual_sink_mass + stats.group_mass[..., 1]
        share = visual_sink_mass / image_mass.clamp_min(1e-30)
        chosen = ((image_mass >= self.opts["min_image_mass"]) & (share <= self.opts["rho"])
                  & after.unsqueeze(1) & self.heads[layer].to(dev).view(1, -1, 1))  # [B, H, rows]
        self.rows_seen += int(after.sum()) * query.shape[1]
        self.rows_edited += int(chosen.sum())
        out = hooks.stock_attention(module, query, key, value, mask, scaling, **kwargs)  # [B, q, H, d]
        edited = torch.where(chosen.transpose(1, 2).unsqueeze(-1), stats.out.transpose(1, 2).to(out.dtype), out[:, lo:])
        return torch.cat([out[:, :lo], edited], dim=1)


def _pad(mask: torch.Tensor, n: int) -> torch.Tensor:
    """A prefill [B, N0] mask extended with False to n key positions (generated tokens)."""
    if mask.shape[1] >= n:
        return mask[:, :n]
    return torch.cat([mask, mask.new_zeros(mask.shape[0], n - mask.shape[1])], dim=1)


def _mass_on(query, key, scaling, lse, keys: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Attention mass [B, H, rows] on the few keys marked in ``keys`` [B, Nk], from their scores and
    the rows' lse (the kernel's log-normaliser): only those keys' scores are computed."""
    B, H, n, d = query.shape
    hkv = key.shape[1]
    count = int(keys.sum(1).max()) if keys.any() else 0
    if count == 0:
        return torch.zeros(B, H, n, device=query.device)
    order = torch.sort(keys.long(), dim=1, descending=True, stable=True).indices[:, :count]  # [B, S]
    valid = torch.gather(keys, 1, order)  # [B, S]
    picked = torch.gather(key, 2, order.view(B, 1, count, 1).expand(B, hkv, count, key.shape[-1]))
    picked = picked[:, torch.arange(H, device=key.device) // (H // hkv)]  # query head -> its kv head
    scores = torch.einsum("bhqd,bhsd->bhqs", query.float(), picked.float()) * scaling
    allowed = valid.view(B, 1, 1, count) & (order.view(B, 1, 1, count) <= rows.view(1, 1, -1, 1))
    finite = torch.isfinite(lse).unsqueeze(-1)
    p = torch.exp(scores - torch.where(finite, lse.unsqueeze(-1), torch.zeros_like(lse.unsqueeze(-1))))
    return torch.where(allowed & finite, p, torch.zeros_like(p)).sum(-1)


@contextlib.contextmanager
def apply(hm, edit, state=None) -> Iterator[_Run]:
    """Install VAR for the block's duration (used by ``intervene``); yields its run state."""
    run = _Run(hm, edit)
    with hm.watch_inputs(run.see_inputs), hm.watch_residual(run.see_residual), hm.edit_attention(run.attention):
        yield run
