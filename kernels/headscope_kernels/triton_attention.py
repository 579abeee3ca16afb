"""Triton backend: FlashAttention-2 style forward with streamed statistics.

``forward``: grid (query block, batch*head); each program loops over key blocks
with an online softmax and keeps extra per-row accumulators for the statistics
(top-1, entropy, match mass) and the fused edits; masks are applied only on tiles
that need them. Group mass is a short second loop, after the main one, over just
the key tiles that hold grouped keys, with the final lse. ``received``: grid (key block,
batch*head); each program loops over query blocks and reuses lse, like
FlashAttention's dK/dV loop. GQA by index: query head h reads KV head h // G.

Supports causal, q_offset, key padding, sliding window, key groups, match ids
(NUM_C channels, unrolled) and every fused edit. A general ``attn_mask`` is not
supported (the dispatcher falls back to torch). Runs on CUDA, or on CPU tensors when TRITON_INTERPRET=1 was set
before this module was imported (``INTERPRETED``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
NEG = tl.constexpr(-1e30)  # finite floor for running maxima (see reference.py)


@triton.jit
def _key_scores(q, k_head, offs_n, n_ok, offs_d, d_ok, skn, skd, qscale, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Scaled scores q @ k^T of the query tile against the key tile at ``offs_n``."""
    k = tl.load(k_head + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
    return tl.dot(q, tl.trans(k), input_precision=PREC) * qscale


@triton.jit
def _mask(s, offs_n, n_ok, row_ok, pos, window, kpm_row, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
          HAS_PAD: tl.constexpr):
    """Scores with -inf where a key is not allowed (past the end, causal, window, padding)."""
    ok = n_ok[None, :] & row_ok[:, None]
    if CAUSAL:
        ok = ok & (offs_n[None, :] <= pos[:, None])
    if HAS_WINDOW:
        ok = ok & ((pos[:, None] - offs_n[None, :]) < window)
    if HAS_PAD:
        kp = tl.load(kpm_row + offs_n, mask=n_ok, other=0)
        ok = ok & (kp[None, :] != 0)
    return tl.where(ok, s, float("-inf"))


@triton.jit
def _fwd_kernel(
    Q, K, V, QSCALE, KPM, GID, GTILES, HSCALE, RWP, KMID, QMID,
    OUT, LSE, GMASS, TOPI, TOPW, ENT, MMASS,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
    skpm, sgid, skmc, skmb, sqmc, sqmb,
    H, G, Nq, Nk, D, q_offset, window, num_groups, n_group_tiles, group_a, group_b,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_PAD: tl.constexpr,
    WANT_OUT: tl.constexpr, WANT_LSE: tl.constexpr, WANT_GROUPS: tl.constexpr,
    WANT_TOP1: tl.constexpr, WANT_ENT: tl.constexpr, WANT_MATCH: tl.constexpr, REWEIGHT: tl.constexpr,
    HEAD_SCALE: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, NUM_C: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # int64: batch offsets can pass 2**31 elements
    h = pid_bh % H
    hk = h // G  # GQA: the KV head this query head reads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Nq
    d_ok = offs_d < D
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    qscale = tl.load(QSCALE + h)
    pos = q_offset + offs_m  # absolute key position of each query row

    # Key blocks that any row of this query block can see.
    lo = 0
    hi = Nk
    if CAUSAL:
        hi = tl.minimum(hi, q_offset + tl.minimum((pid_m + 1) * BLOCK_M, Nq))
    if HAS_WINDOW:
        lo = tl.maximum(lo, q_offset + pid_m * BLOCK_M - window + 1)
        lo = (lo // BLOCK_N) * BLOCK_N

    m_i = tl.full([BLOCK_M], NEG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    gm = tl.zeros([BLOCK_M, BLOCK_G], tl.float32)
    best = tl.full([BLOCK_M], NEG, tl.float32)
    best_i = tl.full([BLOCK_M], -1, tl.int32)
    ent = tl.zeros([BLOCK_M], tl.float32)  # sum p * (s - m), unnormalised
    offs_c = tl.arange(0, BLOCK_C)
    mm = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)  # match mass per channel, unnormalised
    a_mass = tl.zeros([BLOCK_M], tl.float32)
    b_mass = tl.zeros([BLOCK_M], tl.float32)
    a_vec = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    b_vec = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        s = _key_scores(q, K + b * skb + hk * skh, offs_n, n_ok, offs_d, d_ok, skn, skd, qscale, PREC, UPCAST)
        # Masks cost ALU time on every element: only tiles that cross the causal diagonal, the end
        # of the keys or the end of the queries need them (padding and windows: every tile).
        edge = (start_n + BLOCK_N > hi) | ((pid_m + 1) * BLOCK_M > Nq)
        if CAUSAL:
            edge = edge | (start_n + BLOCK_N - 1 > q_offset + pid_m * BLOCK_M)
        if edge | HAS_WINDOW | HAS_PAD:
            s = _mask(s, offs_n, n_ok, row_ok, pos, window, KPM + b * skpm, CAUSAL, HAS_WINDOW, HAS_PAD)
        if WANT_TOP1:  # one (value, index) reduction instead of a max and an argmax
            bmax, barg = tl.max(s, 1, return_indices=True, return_indices_tie_break_left=True)
            better = bmax > best
            best = tl.where(better, bmax, best)
            best_i = tl.where(better, barg + start_n, best_i)
        else:
            bmax = tl.max(s, 1)
        m_new = tl.maximum(m_i, bmax)
        alpha = tl.exp(m_i - m_new)
        x = s - m_new[:, None]
        p = tl.exp(x)  # masked: exp(-inf) = 0
        if WANT_ENT:  # masked: p * max(-inf, NEG) = 0 * NEG = 0, not NaN
            ent = alpha * (ent + (m_i - m_new) * l_i) + tl.sum(p * tl.maximum(x, NEG), 1)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
        if WANT_OUT:
            v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svn + offs_d[None, :] * svd,
                        mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            if UPCAST:
                v = v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        if REWEIGHT:
            gid = tl.load(GID + b * sgid + offs_n, mask=n_ok, other=-1)
        if WANT_MATCH:
            # key ids < 0 are -1 and query ids < 0 are -2 (dispatcher), so == is the whole test
            mm = mm * alpha[:, None]
            for c in tl.static_range(NUM_C):
                kid = tl.load(KMID + c * skmc + b * skmb + offs_n, mask=n_ok, other=-1)
                qid = tl.load(QMID + c * sqmc + b * sqmb + offs_m, mask=row_ok, other=-2)
                part = tl.sum(tl.where(qid[:, None] == kid[None, :], p, 0.0), 1)
                mm += tl.where(offs_c[None, :] == c, part[:, None], 0.0)
        if REWEIGHT:
            pa = tl.where((gid == group_a)[None, :], p, 0.0)
            pb = tl.where((gid == group_b)[None, :], p, 0.0)
            a_mass = a_mass * alpha + tl.sum(pa, 1)
            b_mass = b_mass * alpha + tl.sum(pb, 1)
            a_vec = a_vec * alpha[:, None] + tl.dot(pa.to(v.dtype), v, input_precision=PREC)
            b_vec = b_vec * alpha[:, None] + tl.dot(pb.to(v.dtype), v, input_precision=PREC)

    # Rows that saw no allowed key have l == 0: out 0, lse -inf, stats 0, top1 -1.
    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    if WANT_GROUPS:
        # Group mass in its own loop over only the key tiles that hold grouped keys (GTILES), with the
        # final lse: exact fp32 dots in the main loop would cost more than the attention itself.
        lse_row = tl.where(seen, m_i + tl.log(l_safe), float("inf"))  # +inf: p = 0 on empty rows
        for t in range(0, n_group_tiles):
            start_n = tl.load(GTILES + t) * BLOCK_N
            offs_n = start_n + tl.arange(0, BLOCK_N)
            n_ok = offs_n < hi
            s = _key_scores(q, K + b * skb + hk * skh, offs_n, n_ok, offs_d, d_ok, skn, skd, qscale, PREC, UPCAST)
            s = _mask(s, offs_n, n_ok, row_ok, pos, window, KPM + b * skpm, CAUSAL, HAS_WINDOW, HAS_PAD)
            p = tl.exp(s - lse_row[:, None])
            gid = tl.load(GID + b * sgid + offs_n, mask=n_ok, other=-1)
            onehot = (gid[:, None] == tl.arange(0, BLOCK_G)[None, :]).to(tl.float32)
            gm += tl.dot(p, onehot, input_precision="ieee")
    row = (b * H + h) * Nq + offs_m  # flat row index of the [B, H, Nq] statistics
    if WANT_OUT:
        o = acc
        if REWEIGHT:
            pw = tl.load(RWP + h)
            has_b = b_mass > 0
            ratio = a_mass / tl.where(has_b, b_mass, 1.0)
            corr = (pw - 1.0) * a_vec + ((1.0 - pw) * ratio)[:, None] * b_vec
            o = o + tl.where(has_b[:, None], corr, 0.0)
        o = o / l_safe[:, None]
        if HEAD_SCALE:
            o = o * tl.load(HSCALE + h)
        tl.store(OUT + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
                 o.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    if WANT_LSE:
        tl.store(LSE + row, tl.where(seen, m_i + tl.log(l_safe), float("-inf")), mask=row_ok)
    if WANT_GROUPS:
        offs_g = tl.arange(0, BLOCK_G)
        tl.store(GMASS + row[:, None] * num_groups + offs_g[None, :], gm,
                 mask=row_ok[:, None] & (offs_g < num_groups)[None, :])
    if WANT_MATCH:
        tl.store(MMASS + row[:, None] * NUM_C + offs_c[None, :], mm / l_safe[:, None],
                 mask=row_ok[:, None] & (offs_c < NUM_C)[None, :])
    if WANT_TOP1:
        tl.store(TOPI + row, best_i.to(tl.int64), mask=row_ok)
        tl.store(TOPW + row, tl.where(seen, tl.exp(best - m_i) / l_safe, 0.0), mask=row_ok)
    if WANT_ENT:
        hrow = tl.log(l_safe) - ent / l_safe
        tl.store(ENT + row, tl.where(seen, tl.maximum(hrow, 0.0), 0.0), mask=row_ok)


@triton.jit
def _received_kernel(
    Q, K, QSCALE, LSE, KPM, REC,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, skpm,
    H, G, Nq, Nk, D, q_offset, window, q0, q1,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_PAD: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    hk = h // G
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < Nk
    d_ok = offs_d < D
    k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
                mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
    col_ok = n_ok
    if HAS_PAD:
        kp = tl.load(KPM + b * skpm + offs_n, mask=n_ok, other=0)
        col_ok = col_ok & (kp != 0)
    qscale = tl.load(QSCALE + h)

    # Query rows that can see some key of this block.
    lo = q0
    hi = q1
    if CAUSAL:
        lo = tl.maximum(lo, pid_n * BLOCK_N - q_offset)
    if HAS_WINDOW:
        hi = tl.minimum(hi, pid_n * BLOCK_N + BLOCK_N - 1 + window - q_offset)

    total = tl.zeros([BLOCK_N], tl.float32)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < hi
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        lse = tl.load(LSE + (b * H + h) * Nq + offs_m, mask=m_ok, other=float("inf"))
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qscale
        ok = m_ok[:, None] & col_ok[None, :]
        pos = q_offset + offs_m
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= pos[:, None])
        if HAS_WINDOW:
            ok = ok & ((pos[:, None] - offs_n[None, :]) < window)
        p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
        total += tl.sum(p, 0)
    tl.store(REC + (b * H + h) * Nk + offs_n, total, mask=n_ok)


def _blocks(block_q, block_k, d, dtype):
    """Power-of-two block sizes (at least 16 when compiled for a GPU: tl.dot needs it).

    Defaults 64x64 for 16-bit inputs; 32x32 for fp32, whose exact ("ieee") dots
    need far more registers (64x64 spills to local memory at d=128 on sm_90).
    """
    least = 1 if INTERPRETED else 16
    default = 32 if dtype == torch.float32 else 64
    bm = max(least, triton.next_power_of_2(block_q or default))
    bn = max(least, triton.next_power_of_2(block_k or default))
    bd = max(least, triton.next_power_of_2(d))
    return bm, bn, bd


def _group_tiles(gid, nk, block_n):
    """int32 indices of the key tiles (of ``block_n`` keys) that hold a key of some group, any batch row."""
    n_tiles = triton.cdiv(nk, block_n)
    grouped = torch.zeros(n_tiles * block_n, dtype=torch.bool, device=gid.device)
    grouped[:nk] = (gid >= 0).any(0)
    return grouped.view(n_tiles, block_n).any(1).nonzero().flatten().to(torch.int32)


def _launch(bm, bn, num_warps=None, num_stages=None):
    """Triton launch options: 8 warps for tiles of 128x64 and up, else 4; Triton's default stages."""
    opts = {"num_warps": num_warps or (8 if bm * bn >= 128 * 64 else 4)}
    if num_stages:
        opts["num_stages"] = num_stages
    return opts


def _prec(dtype):
    """(input_precision, upcast) for tl.dot on this input dtype.

    fp32: exact products ("ieee", no TF32) so results match the torch path.
    The interpreter computes bf16 dots wrongly (numpy has no bf16): upcast there.
    """
    upcast = INTERPRETED and dtype == torch.bfloat16
    return ("ieee" if dtype == torch.float32 or upcast else "tf32"), upcast


def forward(q, k, v, *, qscale, causal, q_offset, key_padding_mask, attn_mask, sliding_window,
            group_ids, softcap=None, num_groups, match_ids=None, want_out=True, want_lse=False, want_groups=False,
            want_top1=False, want_entropy=False, want_match=False, reweight=None, head_scale=None,
            block_q=None, block_k=None, num_warps=None, num_stages=None):
    """Same contract as reference.forward (inputs validated by the dispatcher); ``num_warps`` and
    ``num_stages`` are Triton launch knobs (default: :func:`_launch`)."""
    if attn_mask is not None:
        raise ValueError("the Triton kernel does not support a general attn_mask; use backend='torch'")
    if softcap is not None:
        raise ValueError("the Triton kernel does not support softcap; use backend='torch'")
    B, H, Nq, d = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    dev, f32 = q.device, torch.float32
    BM, BN, BD = _blocks(block_q, block_k, d, q.dtype)
    BG = max(1 if INTERPRETED else 16, triton.next_power_of_2(max(num_groups, 1)))
    dummy = qscale
    out = torch.empty(B, H, Nq, d, dtype=q.dtype, device=dev) if want_out else dummy
    lse = torch.empty(B, H, Nq, dtype=f32, device=dev) if want_lse else dummy
    gm = torch.empty(B, H, Nq, num_groups, dtype=f32, device=dev) if want_groups else dummy
    topi = torch.empty(B, H, Nq, dtype=torch.int64, device=dev) if want_top1 else dummy
    topw = torch.empty(B, H, Nq, dtype=f32, device=dev) if want_top1 else dummy
    ent = torch.empty(B, H, Nq, dtype=f32, device=dev) if want_entropy else dummy
    kmid, qmid = match_ids if want_match else (dummy, dummy)  # contiguous int64 [C, B, N]
    nc = kmid.shape[0] if want_match else 1
    mmass = torch.empty(B, H, Nq, nc, dtype=f32, device=dev) if want_match else dummy
    kpm = key_padding_mask.to(torch.int8).contiguous() if key_padding_mask is not None else None
    gid = group_ids.to(torch.int32).contiguous() if group_ids is not None else None
    gtiles = _group_tiles(gid, Nk, BN) if want_groups else None
    n_gtiles = 0 if gtiles is None else gtiles.numel()
    if n_gtiles == 0:  # an int32 placeholder (the kernel reads none of it): loads from it must stay integer
        gtiles = torch.zeros(1, dtype=torch.int32, device=dev)
    ga, gb, rwp = reweight if reweight is not None else (0, 0, None)
    so = out.stride() if want_out else (0, 0, 0, 0)
    prec, upcast = _prec(q.dtype)
    grid = (triton.cdiv(Nq, BM), B * H)
    _fwd_kernel[grid](
        q, k, v, qscale, kpm if kpm is not None else dummy, gid if gid is not None else dummy, gtiles,
        head_scale if head_scale is not None else dummy, rwp if rwp is not None else dummy,
        kmid, qmid, out, lse, gm, topi, topw, ent, mmass,
        *q.stride(), *k.stride(), *v.stride(), *so,
        kpm.stride(0) if kpm is not None and kpm.shape[0] > 1 else 0,
        gid.stride(0) if gid is not None and gid.shape[0] > 1 else 0,
        *(kmid.stride()[:2] if want_match else (0, 0)), *(qmid.stride()[:2] if want_match else (0, 0)),
        H, H // Hkv, Nq, Nk, d, q_offset, sliding_window or 0, num_groups,
        n_gtiles, ga, gb,
        CAUSAL=causal, HAS_WINDOW=sliding_window is not None, HAS_PAD=kpm is not None,
        WANT_OUT=want_out, WANT_LSE=want_lse, WANT_GROUPS=want_groups, WANT_TOP1=want_top1,
        WANT_ENT=want_entropy, WANT_MATCH=want_match, REWEIGHT=want_out and reweight is not None,
        HEAD_SCALE=want_out and head_scale is not None,
        PREC=prec, UPCAST=upcast, NUM_C=nc, BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD, BLOCK_G=BG,
        BLOCK_C=triton.next_power_of_2(nc), **_launch(BM, BN, num_warps, num_stages),
    )
    res = {}
    if want_out:
        res["out"] = out
    if want_lse:
        res["lse"] = lse
    if want_groups:
        res["group_mass"] = gm
    if want_top1:
        res["top1_index"], res["top1_weight"] = topi, topw
    if want_entropy:
        res["entropy"] = ent
    if want_match:
        res["match_mass"] = mmass
    return res


def received(q, k, lse, *, qscale, causal, q_offset, key_padding_mask, attn_mask, sliding_window,
             query_range, softcap=None, block_q=None, block_k=None, num_warps=None, num_stages=None):
    """Same contract as reference.received."""
    if attn_mask is not None:
        raise ValueError("the Triton kernel does not support a general attn_mask; use backend='torch'")
    if softcap is not None:
        raise ValueError("the Triton kernel does not support softcap; use backend='torch'")
    B, H, Nq, d = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    BM, BN, BD = _blocks(block_q, block_k, d, q.dtype)
    # Rows with no allowed key have lse = -inf; +inf makes every p there exactly 0.
    lse = torch.where(torch.isfinite(lse), lse, torch.full_like(lse, float("inf"))).contiguous()
    rec = torch.empty(B, H, Nk, dtype=torch.float32, device=q.device)
    kpm = key_padding_mask.to(torch.int8).contiguous() if key_padding_mask is not None else None
    prec, upcast = _prec(q.dtype)
    grid = (triton.cdiv(Nk, BN), B * H)
    _received_kernel[grid](
        q, k, qscale, lse, kpm if kpm is not None else qscale, rec,
        *q.stride(), *k.stride(), kpm.stride(0) if kpm is not None else 0,
        H, H // Hkv, Nq, Nk, d, q_offset, sliding_window or 0, query_range[0], query_range[1],
        CAUSAL=causal, HAS_WINDOW=sliding_window is not None, HAS_PAD=kpm is not None,
        PREC=prec, UPCAST=upcast, BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD, **_launch(BM, BN, num_warps, num_stages),
    )
    return rec
