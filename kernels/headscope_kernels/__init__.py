"""headscope_kernels: attention plus per-row statistics in one streamed pass.

Public API: :func:`attention_with_stats`, :func:`attention_received`, :class:`AttentionStats`.
Nothing of size [H, Nq, Nk] is ever built; see docs/METHODS.md, "Attention statistics without the pattern".

Arguments of attention_with_stats(q, k, v, scaling, ...):
  q [B, H, Nq, d]; k, v [B, Hkv, Nk, d]; H % Hkv == 0. Query head h reads KV head
      h // (H // Hkv) (GQA by index; K/V are never repeated). fp32, bf16 or fp16,
      accumulated in fp32.
  causal, q_offset: query row i sits at absolute key position q_offset + i
      (default Nk - Nq, bottom-right aligned as with a KV cache); causal lets it
      see keys j <= q_offset + i.
  key_padding_mask: bool [B, Nk], True = real token.
  attn_mask: bool (True = keep) or additive float (0 / -inf; values below -1e30
      count as masked), broadcastable to [B, H, Nq, Nk]; sliced per tile.
  sliding_window: a query at position p sees keys j with p - j < sliding_window.
  softcap: logit soft-capping (Gemma 2): scores s = scaling * q.k become
      softcap * tanh(s / softcap) before masks and attn_mask biases are applied.
  key_groups, num_groups: int [Nk] or [B, Nk], group id per key in
      [0, num_groups) or -1 for none.
  key_match_ids, query_match_ids: int [C, B, Nk] and [C, B, Nq] (or [B, N] for C = 1;
      batch 1 broadcasts): match ids per channel. "match_mass" [B, H, Nq, C] is the
      mass of row i on keys j with key id == query id of i; ids < 0 never match.
      E.g. previous-token: key id = j, query id = q_offset + i - 1.
  outputs: any of "out", "lse", "group_mass", "top1", "entropy", "match_mass".
  Fused edits, applied to ``out`` only, in this order:
    uniform_heads: bool [H], those heads attend uniformly over their allowed keys
      (exactly attention with q = 0 on them);
    reweight=(group_a, group_b, p): per row, weight on group A times p (float or
      [H]); the freed mass goes to group B in proportion to its weights; rows with
      no group-B mass are left unchanged;
    head_scale: float [H], out[:, h] *= head_scale[h].
  backend: "auto" (Triton for CUDA tensors when importable and the options are
      supported, else torch), "torch" or "triton".
  block_q, block_k: tile sizes (defaults tuned per backend).
Rows with no allowed key give out 0, lse -inf, masses 0, top1 index -1 and
weight 0, entropy 0; never NaN. Neither function is differentiable.

Backends: ``reference`` (PyTorch, any device; on CPU tiles are spread over
Python worker threads, and each tile's softmax step is one compiled pass from
``cpu_tile`` when a C++ compiler is there, else eager torch ops) and
``triton_attention`` (CUDA, or CPU under TRITON_INTERPRET=1). Triton has no general attn_mask: "auto" then uses torch,
and an explicit backend="triton" raises ValueError.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import reference

__all__ = ["attention_with_stats", "attention_received", "AttentionStats"]

OUTPUT_NAMES = ("out", "lse", "group_mass", "top1", "entropy", "match_mass")
BACKENDS = ("auto", "torch", "triton")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
TRITON_MAX_CHANNELS = 8  # match channels are unrolled in the Triton kernel


@dataclass
class AttentionStats:
    """Results of :func:`attention_with_stats`; a field is None unless requested."""

    out: Optional[torch.Tensor] = None           # [B, H, Nq, d], q.dtype, after fused edits
    lse: Optional[torch.Tensor] = None           # [B, H, Nq] float32, before edits
    group_mass: Optional[torch.Tensor] = None    # [B, H, Nq, num_groups] float32
    top1_index: Optional[torch.Tensor] = None    # [B, H, Nq] int64, -1 on rows with no key
    top1_weight: Optional[torch.Tensor] = None   # [B, H, Nq] float32
    entropy: Optional[torch.Tensor] = None       # [B, H, Nq] float32, nats
    match_mass: Optional[torch.Tensor] = None    # [B, H, Nq, C] float32


def _fail(msg):
    raise ValueError(msg)


def _check_qkv(q, k, v=None):
    for name, t in (("q", q), ("k", k)) + ((("v", v),) if v is not None else ()):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            _fail(f"{name} must be a 4-D tensor [B, heads, tokens, head_dim]; got "
                  f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.dtype not in _DTYPES:
            _fail(f"{name} has dtype {t.dtype}; use float32, bfloat16 or float16")
        if t.device != q.device:
            _fail(f"{name} is on {t.device} but q is on {q.device}; move all inputs to one device")
    B, H, Nq, d = q.shape
    if k.shape[0] != B or k.shape[3] != d:
        _fail(f"k shape {tuple(k.shape)} does not match q shape {tuple(q.shape)}: "
              f"expected k as [B={B}, Hkv, Nk, d={d}]")
    Hkv, Nk = k.shape[1], k.shape[2]
    if Hkv == 0 or H % Hkv != 0:
        _fail(f"query heads H={H} must be a multiple of key/value heads Hkv={Hkv} (GQA); "
              "check the head dimension (dim 1) of q and k")
    if v is not None:
        if v.shape[:3] != k.shape[:3]:
            _fail(f"v shape {tuple(v.shape)} does not match k shape {tuple(k.shape)} in [B, Hkv, Nk]")
        if v.dtype != q.dtype or k.dtype != q.dtype:
            _fail(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    elif k.dtype != q.dtype:
        _fail(f"q and k must share a dtype; got {q.dtype}, {k.dtype}")
    return B, H, Nq, d, Hkv, Nk


def _check_masks(q, B, H, Nq, Nk, causal, q_offset, key_padding_mask, attn_mask, sliding_window, softcap=None):
    if q_offset is None:
        q_offset = Nk - Nq
    if not isinstance(q_offset, int) or isinstance(q_offset, bool):
        _fail(f"q_offset must be an int (absolute key position of query row 0); got {q_offset!r}")
    if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
        _fail(f"sliding_window must be a positive int or None; got {sliding_window!r}")
    if softcap is not None:
        try:
            softcap = float(softcap)
        except (TypeError, ValueError):
            softcap = -1.0
        if not softcap > 0:
            _fail("softcap must be a positive float (e.g. Gemma 2's attn_logit_softcapping = 50.0) or None")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            _fail("key_padding_mask must be a bool tensor [B, Nk] (True = real token); "
                  "convert with mask.bool()")
        if tuple(key_padding_mask.shape) != (B, Nk):
            _fail(f"key_padding_mask has shape {tuple(key_padding_mask.shape)}; expected [B, Nk] = {(B, Nk)}")
        key_padding_mask = key_padding_mask.to(q.device)
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor) or not (
                attn_mask.dtype == torch.bool or attn_mask.is_floating_point()):
            _fail("attn_mask must be a bool tensor (True = keep) or a float additive tensor (0 / -inf)")
        if attn_mask.dim() > 4:
            _fail(f"attn_mask has {attn_mask.dim()} dims; it must broadcast to [B, H, Nq, Nk]")
        am = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
        for have, full, what in zip(am.shape, (B, H, Nq, Nk), ("B", "H", "Nq", "Nk")):
            if have not in (1, full):
                _fail(f"attn_mask shape {tuple(attn_mask.shape)} does not broadcast to "
                      f"[B, H, Nq, Nk] = {(B, H, Nq, Nk)}: its {what} dim is {have}, expected 1 or {full}")
        attn_mask = am.to(q.device)
    return dict(causal=bool(causal), q_offset=q_offset, key_padding_mask=key_padding_mask,
                attn_mask=attn_mask, sliding_window=sliding_window, softcap=softcap)


def _per_head(x, H, name, device):
    """A float or [H] tensor -> float32 [H]."""
    t = torch.as_tensor(x, dtype=torch.float32, device=device)
    if t.dim() == 0:
        t = t.expand(H)
    if tuple(t.shape) != (H,):
        _fail(f"{name} must be a float or a tensor of shape [H] = [{H}]; got shape {tuple(t.shape)}")
    return t.contiguous()


def _check_groups(key_groups, num_groups, B, Nk, device):
    """Validate key_groups; return a float32 one-hot [Bg, Nk, num_groups]."""
    if not isinstance(num_groups, int) or num_groups < 0:
        _fail(f"num_groups must be a non-negative int; got {num_groups!r}")
    if not isinstance(key_groups, torch.Tensor) or key_groups.dtype not in _INT_DTYPES:
        _fail("key_groups must be an integer tensor [Nk] or [B, Nk] of group ids (-1 = no group)")
    if key_groups.dim() == 1:
        key_groups = key_groups.unsqueeze(0)
    if key_groups.dim() != 2 or key_groups.shape[1] != Nk or key_groups.shape[0] not in (1, B):
        _fail(f"key_groups has shape {tuple(key_groups.shape)}; "
              f"expected [Nk] = [{Nk}] or [B, Nk] = [{B}, {Nk}]")
    key_groups = key_groups.to(device=device, dtype=torch.int64)
    if key_groups.numel() and (key_groups.min() < -1 or key_groups.max() >= num_groups):
        _fail(f"key_groups ids must lie in [0, num_groups={num_groups}) or be -1; found values in "
              f"[{int(key_groups.min())}, {int(key_groups.max())}]; raise num_groups or fix the ids")
    ids = torch.arange(num_groups, device=device)
    return (key_groups.unsqueeze(-1) == ids).to(torch.float32), key_groups


def _check_match_ids(key_ids, query_ids, B, Nq, Nk, device):
    """Validate match ids; return int64 (key [C, B, Nk], query [C, B, Nq]), contiguous.

    Negative ids become -1 on keys and -2 on queries, so the kernels only test equality.
    """
    if key_ids is None or query_ids is None:
        _fail("match ids come in pairs: give both key_match_ids [C, B, Nk] and query_match_ids [C, B, Nq]")
    fixed = []
    for name, ids, n, what in (("key_match_ids", key_ids, Nk, "Nk"),
                               ("query_match_ids", query_ids, Nq, "Nq")):
        if not isinstance(ids, torch.Tensor) or ids.dtype not in _INT_DTYPES:
            _fail(f"{name} must be an integer (int64) tensor [C, B, {what}] or [B, {what}]; got "
                  f"{ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__}")
        if ids.dim() == 2:
            ids = ids.unsqueeze(0)
        if ids.dim() != 3 or ids.shape[0] < 1 or ids.shape[1] not in (1, B) or ids.shape[2] != n:
            _fail(f"{name} has shape {tuple(ids.shape)}; expected [C, B, {what}] = [C, {B}, {n}] "
                  f"or [B, {what}] = [{B}, {n}] (a batch dim of 1 broadcasts)")
        fixed.append(ids.to(device=device, dtype=torch.int64).expand(-1, B, -1))
    key, query = fixed
    if key.shape[0] != query.shape[0]:
        _fail(f"key_match_ids has {key.shape[0]} channels but query_match_ids has {query.shape[0]}; "
              "both need the same C")
    return key.clamp_min(-1).contiguous(), query.masked_fill(query < 0, -2).contiguous()


def _triton_module():
    """The Triton backend module, or None when Triton cannot be imported."""
    try:
        from . import triton_attention
    except Exception:  # ImportError, or triton failing to initialise
        return None
    return triton_attention


def _pick_backend(backend, q, unsupported):
    """Resolve "auto"; raise if triton was asked for and cannot do this call."""
    if backend not in BACKENDS:
        _fail(f"unknown backend {backend!r}; use one of {BACKENDS}")
    if backend == "torch" or (backend == "auto" and (unsupported or not q.is_cuda)):
        return "torch"
    mod = _triton_module()
    if backend == "auto":
        return "triton" if mod is not None else "torch"
    if mod is None:
        _fail("backend='triton' requested but triton is not importable; "
              "install it (pip install 'headscope[triton]') or use backend='torch'")
    if not (q.is_cuda or mod.INTERPRETED):
        _fail(f"backend='triton' needs CUDA tensors (q is on {q.device}); move them to a GPU, "
              "set TRITON_INTERPRET=1 before importing triton, or use backend='torch'")
    if unsupported:
        _fail(f"backend='triton' does not support {unsupported}; use backend='torch' or 'auto'")
    return "triton"


def _check_block(x, name):
    if x is not None and (not isinstance(x, int) or x < 1):
        _fail(f"{name} must be a positive int or None; got {x!r}")


@torch.no_grad()
def attention_with_stats(q, k, v, scaling, *, causal=False, q_offset=None, key_padding_mask=None,
                         attn_mask=None, sliding_window=None, softcap=None, key_groups=None, num_groups=0,
                         key_match_ids=None, query_match_ids=None, outputs=("out",),
                         head_scale=None, uniform_heads=None, reweight=None,
                         backend="auto", block_q=None, block_k=None) -> AttentionStats:
    """Attention output and per-row statistics without materialising [H, Nq, Nk].

    q [B, H, Nq, d]; k, v [B, Hkv, Nk, d]. Statistics (lse, group_mass, top1,
    entropy, match_mass) describe the unedited attention; ``out`` carries the fused edits
    (uniform_heads, then reweight, then head_scale). Not differentiable (runs
    under no_grad). Argument details: docstring of this module.
    """
    B, H, Nq, d, Hkv, Nk = _check_qkv(q, k, v)
    try:
        scaling = float(scaling)
    except (TypeError, ValueError):
        _fail(f"scaling must be a float (usually head_dim ** -0.5); got {scaling!r}")
    if isinstance(outputs, str):
        outputs = (outputs,)
    outputs = tuple(outputs)
    for name in outputs:
        if name not in OUTPUT_NAMES:
            _fail(f"unknown output {name!r}; choose from {OUTPUT_NAMES}")
    _check_block(block_q, "block_q")
    _check_block(block_k, "block_k")
    mk = _check_masks(q, B, H, Nq, Nk, causal, q_offset, key_padding_mask, attn_mask, sliding_window, softcap)
    dev = q.device

    onehot = group_ids = None
    if key_groups is not None:
        onehot, group_ids = _check_groups(key_groups, num_groups, B, Nk, dev)
    if "group_mass" in outputs and (onehot is None or num_groups == 0):
        _fail("output 'group_mass' needs key_groups (ids per key) and num_groups > 0")
    match_ids = None
    if key_match_ids is not None or query_match_ids is not None:
        match_ids = _check_match_ids(key_match_ids, query_match_ids, B, Nq, Nk, dev)
    elif "match_mass" in outputs:
        _fail("output 'match_mass' needs key_match_ids [C, B, Nk] and query_match_ids [C, B, Nq]")
    if head_scale is not None:
        head_scale = _per_head(head_scale, H, "head_scale", dev)
    if uniform_heads is not None:
        if not isinstance(uniform_heads, torch.Tensor) or uniform_heads.dtype != torch.bool \
                or tuple(uniform_heads.shape) != (H,):
            _fail(f"uniform_heads must be a bool tensor of shape [H] = [{H}]")
        uniform_heads = uniform_heads.to(dev)
        if not bool(uniform_heads.any()):
            uniform_heads = None
    if reweight is not None:
        if not isinstance(reweight, (tuple, list)) or len(reweight) != 3:
            _fail("reweight must be a tuple (group_a, group_b, p)")
        ga, gb, p = reweight
        if onehot is None:
            _fail("reweight needs key_groups and num_groups so that groups A and B are defined")
        for g in (ga, gb):
            if not isinstance(g, int) or not 0 <= g < num_groups:
                _fail(f"reweight group {g!r} is not a group id in [0, num_groups={num_groups})")
        reweight = (ga, gb, _per_head(p, H, "reweight p", dev))

    unsupported = []
    if attn_mask is not None:
        unsupported.append("a general attn_mask")
    if mk["softcap"] is not None:
        unsupported.append("softcap")
    if v.shape[-1] != d:
        unsupported.append("a value head_dim different from the key head_dim")
    if "match_mass" in outputs and match_ids[0].shape[0] > TRITON_MAX_CHANNELS:
        unsupported.append(f"more than {TRITON_MAX_CHANNELS} match channels "
                           f"(got C={match_ids[0].shape[0]})")
    backend = _pick_backend(backend, q, ", ".join(unsupported))

    want = dict(want_lse="lse" in outputs, want_groups="group_mass" in outputs,
                want_top1="top1" in outputs, want_entropy="entropy" in outputs,
                want_match="match_mass" in outputs)
    want_stats = any(want.values())
    base_scale = torch.full((H,), scaling, dtype=torch.float32, device=dev)
    if backend == "triton":
        run = _triton_module().forward
        common = dict(mk, group_ids=group_ids, num_groups=num_groups, match_ids=match_ids,
                      block_q=block_q, block_k=block_k)
    else:
        run = reference.forward
        common = dict(masks=reference.Masks(B=B, H=H, Hkv=Hkv, Nq=Nq, Nk=Nk, device=dev, **mk),
                      onehot=onehot, match_ids=match_ids, block_q=block_q, block_k=block_k)

    res = {}
    want_out = "out" in outputs
    if uniform_heads is not None and want_out:
        # Uniform heads are exactly attention with q = 0 on those heads; when the
        # statistics of the real attention are also wanted, that is a second pass.
        out_scale = torch.where(uniform_heads, torch.zeros_like(base_scale), base_scale)
        res.update(run(q, k, v, qscale=out_scale, want_out=True, reweight=reweight,
                       head_scale=head_scale, **common))
        if want_stats:
            res.update(run(q, k, v, qscale=base_scale, want_out=False, **want, **common))
    elif want_out:
        res.update(run(q, k, v, qscale=base_scale, want_out=True, reweight=reweight,
                       head_scale=head_scale, **want, **common))
    elif want_stats:
        res.update(run(q, k, v, qscale=base_scale, want_out=False, **want, **common))
    return AttentionStats(**res)


@torch.no_grad()
def attention_received(q, k, scaling, lse=None, *, causal=False, q_offset=None, key_padding_mask=None,
                       attn_mask=None, sliding_window=None, softcap=None, query_range=None, backend="auto",
                       block_q=None, block_k=None) -> torch.Tensor:
    """Softmax probability each key receives, summed over queries: float32 [B, H, Nk].

    ``query_range`` = (start, stop) over query rows (default all). ``lse`` [B, H, Nq]
    from :func:`attention_with_stats` is reused when given, else computed first.
    """
    B, H, Nq, d, Hkv, Nk = _check_qkv(q, k)
    try:
        scaling = float(scaling)
    except (TypeError, ValueError):
        _fail(f"scaling must be a float (usually head_dim ** -0.5); got {scaling!r}")
    _check_block(block_q, "block_q")
    _check_block(block_k, "block_k")
    mk = _check_masks(q, B, H, Nq, Nk, causal, q_offset, key_padding_mask, attn_mask, sliding_window, softcap)
    if query_range is None:
        query_range = (0, Nq)
    try:
        q0, q1 = (int(x) for x in query_range)
    except (TypeError, ValueError):
        _fail(f"query_range must be a (start, stop) pair of ints; got {query_range!r}")
    if not 0 <= q0 <= q1 <= Nq:
        _fail(f"query_range {query_range!r} must satisfy 0 <= start <= stop <= Nq = {Nq}")
    if lse is not None:
        if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != (B, H, Nq):
            _fail(f"lse must be a tensor of shape [B, H, Nq] = {(B, H, Nq)} "
                  "(attention_with_stats(..., outputs=('lse',)).lse)")
        lse = lse.to(device=q.device, dtype=torch.float32)
    backend = _pick_backend(backend, q, ", ".join(
        x for x, on in (("a general attn_mask", attn_mask is not None), ("softcap", softcap is not None)) if on))
    if lse is None:
        lse = attention_with_stats(q, k, k, scaling, outputs=("lse",), backend=backend,
                                   block_q=block_q, block_k=block_k, **mk).lse
    qscale = torch.full((H,), scaling, dtype=torch.float32, device=q.device)
    if backend == "triton":
        return _triton_module().received(q, k, lse, qscale=qscale, query_range=(q0, q1),
                                         block_q=block_q, block_k=block_k, **mk)
    masks = reference.Masks(B=B, H=H, Hkv=Hkv, Nq=Nq, Nk=Nk, device=q.device, **mk)
    return reference.received(q, k, lse, qscale=qscale, masks=masks, query_range=(q0, q1),
                              block_q=block_q, block_k=block_k)
