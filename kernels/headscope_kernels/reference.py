"""Exact attention with streamed statistics in plain PyTorch.

Works in (query block x key block) tiles with an online softmax, so nothing of
size [H, Nq, Nk] is ever built: peak extra memory is O(B * H * block_q * block_k)
per worker thread.
GQA is index arithmetic: the query heads that share a KV head are stacked as
extra rows of one matmul against that KV head, K and V are never repeated.

Inputs here are already validated and normalised by ``headscope_kernels``.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from . import cpu_tile

# Masked scores are set to MASKED, a finite value, so a tile row whose keys are all
# masked still has a finite softmax (uniform) instead of NaN; it then gets weight 0
# because its max is below NEG. Running maxima start at NEG, so exp(m_old - m_new)
# and (m_old - m_new) * l stay finite. Additive mask values below NEG count as masked.
NEG = -1e30
MASKED = -3e38

# Scores are kept in log2 units (s * log2 e, folded into the query scale) so that every
# exponential is exp2: on CPU torch's exp2 is 2-3x faster than exp over a tile, and far
# faster on very negative inputs (masked keys, distant scores), where exp slows down ~20x.
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# Tiles of about 2**19 scores (2 MiB in fp32) stay in cache and measured fastest on CPU.
DEFAULT_BLOCK_K = 512
TILE_SCORES = 2**19

# The CPU backend's per-tile softmax step: "cpp" (``cpu_tile``'s hand-written C++, when it builds;
# else eager), "compile" (torch.compile of :func:`softmax_step_eager`) or "eager". Set by
# benchmarks/kernel_cpu.py --tiles to compare them; accelerators always run the eager step. The C++
# tile is the default because it measured faster than the compiled step (README, "The CPU tile step").
CPU_STEP = "cpp"
CPU_STEPS = ("cpp", "compile", "eager")
_compiled_step = None


def default_blocks(B, H, Nq, block_q, block_k):
    """Block sizes: the given ones, else a tile of about TILE_SCORES scores.

    Short query blocks (decoding: Nq = 1) get wider key blocks, so that a step
    over a long KV cache is a few large tiles rather than many tiny ones.
    """
    bq = block_q or max(16, min(1024, TILE_SCORES // (B * H * DEFAULT_BLOCK_K)))
    bq = min(bq, max(Nq, 1))
    bk = block_k or max(DEFAULT_BLOCK_K, min(16384, TILE_SCORES // (B * H * bq)))
    return bq, bk


class Masks:
    """Everything that decides which (query, key) pairs are allowed, sliced per tile, and the
    softcap that shapes the scores before that (all on scores in log2 units, s * log2 e)."""

    def __init__(self, *, B, H, Hkv, Nq, Nk, causal, q_offset, key_padding_mask,
                 attn_mask, sliding_window, device, softcap=None):
        self.B, self.H, self.Hkv, self.G = B, H, Hkv, H // Hkv
        self.Nq, self.Nk = Nq, Nk
        self.causal, self.q_offset, self.window = causal, q_offset, sliding_window
        self.kpm = key_padding_mask          # bool [B, Nk] or None
        self.attn_mask = attn_mask           # 4-D, each dim 1 or full size, or None
        self.device = device
        self.softcap = softcap               # float or None: s -> softcap * tanh(s / softcap)
        self.softcap2 = None if softcap is None else softcap * LOG2E  # the same cap in log2 units

    def key_range(self, qs, qe):
        """Keys [lo, hi) that any query row in [qs, qe) may see."""
        hi = self.Nk
        if self.causal:
            hi = min(hi, self.q_offset + qe)  # last query sees keys <= q_offset + qe - 1
        lo = 0
        if self.window is not None:
            lo = max(0, self.q_offset + qs - self.window + 1)
        return lo, max(lo, hi)

    def query_range(self, ks, ke, q0, q1):
        """Query rows within [q0, q1) that may see some key in [ks, ke)."""
        lo, hi = q0, q1
        if self.causal:
            lo = max(lo, ks - self.q_offset)
        if self.window is not None:
            hi = min(hi, ke - 1 + self.window - self.q_offset)
        return lo, max(lo, hi)

    def apply(self, s, qs, qe, ks, ke):
        """Mask the score tile ``s`` [B, Hkv, G*(qe-qs), ke-ks] (log2 units) in place (masked -> MASKED)."""
        n, m = qe - qs, ke - ks
        if self.softcap2 is not None:  # log2e * c tanh(s / c) = c2 tanh(s2 / c2), c2 = c log2e
            s.div_(self.softcap2).tanh_().mul_(self.softcap2)
        s5 = s.view(self.B, self.Hkv, self.G, n, m)
        am = self.attn_mask
        if am is not None:
            am = am[:, :, qs:qe] if am.shape[2] > 1 else am
            am = am[..., ks:ke] if am.shape[3] > 1 else am
            am = am.view(am.shape[0], self.Hkv, self.G, *am.shape[2:]) if am.shape[1] > 1 \
                else am.unsqueeze(1)
            if am.dtype != torch.bool:
                s5.add_(am.to(s.dtype), alpha=LOG2E).clamp_min_(MASKED)  # -inf -> MASKED
                am = None
        first, last = self.q_offset + qs, self.q_offset + qe - 1  # absolute query positions
        cut_right = self.causal and ke - 1 > first
        cut_left = self.window is not None and last - ks >= self.window
        pad = None
        if self.kpm is not None:
            pad = self.kpm[:, ks:ke]
            pad = None if bool(pad.all()) else pad.view(self.B, 1, 1, 1, m)
        # Position masks only touch a strip of columns next to the diagonal.
        lo, hi = 0, m
        if pad is None and am is None:
            if cut_right and not cut_left:
                lo = max(0, first + 1 - ks)
            elif cut_left and not cut_right:
                hi = min(m, last - self.window + 1 - ks)
        allowed = None
        if cut_right or cut_left:
            qpos = torch.arange(first, last + 1, device=self.device).unsqueeze(1)
            kpos = torch.arange(ks + lo, ks + hi, device=self.device).unsqueeze(0)
            if cut_right:
                allowed = kpos <= qpos
            if cut_left:
                inside = (qpos - kpos) < self.window
                allowed = inside if allowed is None else allowed & inside
        for extra in (pad, am):
            if extra is not None:
                allowed = extra if allowed is None else allowed & extra
        if allowed is not None:
            s5[..., lo:hi].masked_fill_(~allowed, MASKED)
        return s


def run_blocks(fn, starts, device):
    """Call ``fn(start)`` for every block start; blocks write disjoint output slices.

    On CPU the blocks are spread over torch.get_num_threads() Python threads, each
    running torch single-threaded. A tile is a dozen small ops, and giving every op
    all cores costs a barrier per op, which stalls badly whenever cores are shared.
    Largest blocks (latest, under a causal mask) go first to balance the workers.
    """
    starts = list(starts)[::-1]
    workers = min(torch.get_num_threads(), len(starts)) if device.type == "cpu" else 1
    if workers <= 1:
        for start in starts:
            fn(start)
        return
    threads = torch.get_num_threads()
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    def call(start):  # grad and inference mode are per thread: carry the caller's over
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            fn(start)

    try:
        with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            for _ in pool.map(call, starts):  # re-raises the first error
                pass
    finally:
        torch.set_num_threads(threads)  # the per-thread setting also moved the global default


def _per_row(vec, Hkv, G, n):
    """Per-head values [H] -> per tile row [1, Hkv, G*n]."""
    return vec.view(1, Hkv, G, 1).expand(1, Hkv, G, n).reshape(1, Hkv, G * n)


def _prep_q(q, qs, qe, qscale, Hkv):
    """Query block as fp32 [B, Hkv, G*n, d], scaled per head and by log2 e (one small copy):
    its scores come out in log2 units."""
    B, H, _, d = q.shape
    qb = q[:, :, qs:qe].to(torch.float32) * (qscale * LOG2E).view(1, H, 1, 1)
    return qb.reshape(B, Hkv, (H // Hkv) * (qe - qs), d)


TOP1_CHUNK = 64  # keys per chunk for the top-1 index search (see first_argmax)


def chunk_max(s, chunk=TOP1_CHUNK):
    """Per row of the tile ``s`` [..., m] (m a multiple of ``chunk``), the max of each chunk of keys:
    [rows, m // chunk]. One pass, as fast as the row max, which is its max."""
    m = s.shape[-1]
    return s.reshape(-1, m // chunk, chunk).amax(-1)


def first_argmax(s, rows, cmax=None, chunk=TOP1_CHUNK):
    """Index of the first maximum in each of ``rows`` of the tile ``s`` [..., m] (rows of s.view(-1, m)).

    torch's argmax is slow on CPU: when m is a multiple of ``chunk``, find the first chunk
    holding the row maximum with a (fast) amax per chunk (``cmax``, :func:`chunk_max`, when
    already computed), then argmax only inside it.
    """
    m = s.shape[-1]
    x = s.reshape(-1, m)
    if m % chunk:
        return x.index_select(0, rows).argmax(-1)
    x = x.view(-1, m // chunk, chunk)
    cmax = x.index_select(0, rows).amax(-1) if cmax is None else cmax.index_select(0, rows)
    first = first_true(cmax == cmax.amax(-1, keepdim=True))  # first chunk holding the max
    inside = x[rows, first]
    return first * chunk + first_true(inside == inside.amax(-1, keepdim=True))


def first_true(hits):
    """Index of the first True along the last axis of a bool tensor [..., n] with one in every row
    (as amax of descending weights: torch's argmax is slow on CPU)."""
    n = hits.shape[-1]
    weights = torch.arange(n, 0, -1, dtype=torch.float32, device=hits.device)
    return n - (hits * weights).amax(-1).long()


def match_tile(p, key_ids, query_ids, qs, qe, ks, ke):
    """Per channel, sum of the tile ``p`` [B, Hkv, G*n, m] over keys whose id equals the row's.

    key_ids int64 [C, B, Nk], query_ids [C, B, Nq] (negatives already made unequal).
    Returns [B, Hkv, G*n, C]; builds one [B, n, m] bool tile per channel.
    """
    B, Hkv, rows, m = p.shape
    n = qe - qs
    p5 = p.view(B, Hkv, rows // n, n, m)
    parts = []
    for kid, qid in zip(key_ids[:, :, ks:ke], query_ids[:, :, qs:qe]):
        hit = (qid.unsqueeze(-1) == kid.unsqueeze(1)).view(B, 1, 1, n, m)
        parts.append(torch.where(hit, p5, 0.0).sum(-1))
    return torch.stack(parts, -1).view(B, Hkv, rows, len(parts))


def softmax_step_eager(s, p_out, m, l, ent, best_i, ks):
    """One online-softmax step over the score tile ``s`` [B, Hkv, rows, m] (log2 units, masked), in
    torch ops: p = 2^(s - tile max) into ``p_out`` (``s`` itself unless the entropy is wanted), and
    the running max ``m``, sum ``l``, entropy term ``ent`` (sum p (s - m), or None) and top-1 index
    ``best_i`` (or None) updated in place. Returns (p, alpha, w): alpha rescales the running
    accumulators, w weighs this tile's contributions. ``cpu_tile`` compiles the same step.
    """
    dev = s.device
    width = s.shape[-1]
    # on CPU the chunk maxima give the row max and locate the top-1 key in one pass
    cmax = chunk_max(s) if best_i is not None and dev.type == "cpu" and width % TOP1_CHUNK == 0 else None
    bmax = s.amax(dim=-1) if cmax is None else cmax.amax(-1).view(m.shape)
    # strict > keeps the earliest key on ties, like argmax within a tile
    if best_i is not None and dev.type == "cpu":
        # index search only on the rows whose running max this tile beats
        beat = (bmax > m).view(-1).nonzero().squeeze(1)
        if beat.numel():
            best_i.view(-1)[beat] = first_argmax(s, beat, cmax) + ks
    elif best_i is not None:  # on accelerators stay sync-free (nonzero would sync)
        best_i.copy_(torch.where(bmax > m, s.argmax(-1) + ks, best_i))
    # p = 2^(s - bmax): 1 at the tile's max, 0 on masked keys (three passes over the tile, no
    # normalisation: the running sums carry it). Rows with no allowed key shift by 0 instead,
    # so their p is 2^MASKED = 0 too.
    allowed = bmax > NEG
    s.sub_(torch.where(allowed, bmax, 0.0).unsqueeze(-1))
    p = torch.exp2(s, out=p_out) if p_out is not s else s.exp2_()
    l_tile = p.sum(-1)
    m_new = torch.maximum(m, bmax)
    alpha = torch.exp2(m - m_new)
    # the tile's weight relative to m_new; 0 on rows with no allowed key
    w = torch.where(allowed, torch.exp2(bmax - m_new), 0.0)
    if ent is not None:
        h_tile = s.mul_(p).sum(-1)  # sum p (s - bmax), in place (vecdot builds a tile-sized temporary)
        ent.copy_(alpha * (ent + (m - m_new) * l) + w * (h_tile + l_tile * (bmax - m_new)))
    l.copy_(l * alpha + w * l_tile)
    m.copy_(m_new)
    return p, alpha, w


def compiled_softmax_step():
    """torch.compile of :func:`softmax_step_eager` (built once; shapes and ``ks`` dynamic)."""
    global _compiled_step
    if _compiled_step is None:
        _compiled_step = torch.compile(softmax_step_eager, dynamic=True)
    return _compiled_step


def forward(q, k, v, *, qscale, masks, onehot=None, match_ids=None, want_out=True, want_lse=False,
            want_groups=False, want_top1=False, want_entropy=False, want_match=False, reweight=None,
            head_scale=None, block_q=None, block_k=None):
    """Streamed attention forward. Returns a dict of the requested results.

    qscale: float32 [H], multiplies q (the softmax scaling; 0 makes a head uniform).
    onehot: float32 [Bg, Nk, num_groups] (Bg in {1, B}) group membership, or None.
    match_ids: (key ids int64 [C, B, Nk], query ids [C, B, Nq]) or None; negative key ids
    are -1 and negative query ids -2, so equality is the whole match test.
    reweight: (group_a, group_b, p float32 [H]) or None; applies to ``out``.
    head_scale: float32 [H] or None; applies to ``out``.
    """
    B, H, Nq, d = q.shape
    Hkv, Nk, dv = k.shape[1], k.shape[2], v.shape[3]
    G = H // Hkv
    bq, bk = default_blocks(B, H, Nq, block_q, block_k)
    f32, dev = torch.float32, q.device
    ng = onehot.shape[-1] if onehot is not None else 0
    if CPU_STEP not in CPU_STEPS:
        raise ValueError(f"reference.CPU_STEP must be one of {CPU_STEPS}; got {CPU_STEP!r}")
    step = CPU_STEP if dev.type == "cpu" else "eager"
    compiled = cpu_tile.kernel() if step == "cpp" else None  # the fused C++ tile step, when it builds
    eager_step = compiled_softmax_step() if step == "compile" else softmax_step_eager

    res = {}
    if want_out:
        res["out"] = torch.empty(B, H, Nq, dv, dtype=q.dtype, device=dev)
    if want_lse:
        res["lse"] = torch.empty(B, H, Nq, dtype=f32, device=dev)
    if want_groups:
        res["group_mass"] = torch.empty(B, H, Nq, ng, dtype=f32, device=dev)
        grouped = (onehot != 0).any(-1).any(0).cpu()  # [Nk]: keys in some group, in some batch row
    if want_top1:
        res["top1_index"] = torch.empty(B, H, Nq, dtype=torch.int64, device=dev)
        res["top1_weight"] = torch.empty(B, H, Nq, dtype=f32, device=dev)
    if want_entropy:
        res["entropy"] = torch.empty(B, H, Nq, dtype=f32, device=dev)
    if want_match:
        key_ids, query_ids = match_ids
        nc = key_ids.shape[0]
        res["match_mass"] = torch.empty(B, H, Nq, nc, dtype=f32, device=dev)
    if reweight is not None:
        ga, gb, rw_p = reweight
        sel_ab = onehot[..., [ga, gb]]                       # [Bg, Nk, 2]
        in_a = onehot[..., ga].unsqueeze(1).unsqueeze(-1)    # [Bg, 1, Nk, 1]
        in_b = onehot[..., gb].unsqueeze(1).unsqueeze(-1)

    def one_block(qs):
            qe = min(qs + bq, Nq)
            n = qe - qs
            rows = G * n
            qb = _prep_q(q, qs, qe, qscale, Hkv)
            m = torch.full((B, Hkv, rows), NEG, dtype=f32, device=dev)
            l = torch.zeros(B, Hkv, rows, dtype=f32, device=dev)
            if want_out:
                acc = torch.zeros(B, Hkv, rows, dv, dtype=f32, device=dev)
            if want_groups:
                gm = torch.zeros(B, Hkv, rows, ng, dtype=f32, device=dev)
            if want_top1:  # the top-1 score is the running max m; only its index is tracked
                best_i = torch.full((B, Hkv, rows), -1, dtype=torch.int64, device=dev)
            if want_entropy:
                ent = torch.zeros(B, Hkv, rows, dtype=f32, device=dev)  # sum p*(s-m), unnormalised
            if want_match:
                mm = torch.zeros(B, Hkv, rows, nc, dtype=f32, device=dev)
            if reweight is not None:
                ab_mass = torch.zeros(B, Hkv, rows, 2, dtype=f32, device=dev)
                a_vec = torch.zeros(B, Hkv, rows, dv, dtype=f32, device=dev)
                b_vec = torch.zeros(B, Hkv, rows, dv, dtype=f32, device=dev)

            k_lo, k_hi = masks.key_range(qs, qe)
            # score and probability tiles reuse their buffers across the key blocks (p is computed
            # in place of s, except by the eager step when the entropy needs both)
            s_buf = torch.empty(B * Hkv * rows * min(bk, k_hi - k_lo), dtype=f32, device=dev)
            p_buf = torch.empty_like(s_buf) if want_entropy and compiled is None else None
            for ks in range(k_lo, k_hi, bk):
                ke = min(ks + bk, k_hi)
                size, numel = (B, Hkv, rows, ke - ks), B * Hkv * rows * (ke - ks)
                s = torch.matmul(qb, k[:, :, ks:ke].to(f32).transpose(-1, -2), out=s_buf[:numel].view(size))
                masks.apply(s, qs, qe, ks, ke)
                state = (m, l, ent if want_entropy else None, best_i if want_top1 else None)
                if compiled is not None:
                    p = s
                    alpha, w = cpu_tile.softmax_step(compiled, s, p, *state, ks, NEG, MASKED)
                else:
                    p_out = p_buf[:numel].view(size) if p_buf is not None else s
                    p, alpha, w = eager_step(s, p_out, *state, ks)
                a4, w4 = alpha.unsqueeze(-1), w.unsqueeze(-1)
                if want_out:
                    vb = v[:, :, ks:ke].to(f32)
                    acc.mul_(a4).add_(torch.matmul(p, vb).mul_(w4))
                if want_groups or reweight is not None:
                    p_flat = p.view(B, Hkv * rows, ke - ks)
                if want_groups:
                    gm.mul_(a4)
                    if grouped[ks:ke].any():  # most key blocks hold no grouped key: skip their pass over p
                        gm.add_(torch.matmul(p_flat, onehot[:, ks:ke]).view(B, Hkv, rows, ng).mul_(w4))
                if want_match:
                    mm.mul_(a4).add_(match_tile(p, key_ids, query_ids, qs, qe, ks, ke).mul_(w4))
                if reweight is not None:
                    ab = torch.matmul(p_flat, sel_ab[:, ks:ke]).view(B, Hkv, rows, 2)
                    ab_mass.mul_(a4).add_(ab.mul_(w4))
                    a_vec.mul_(a4).add_(torch.matmul(p, vb * in_a[:, :, ks:ke]).mul_(w4))
                    b_vec.mul_(a4).add_(torch.matmul(p, vb * in_b[:, :, ks:ke]).mul_(w4))

            # Finalise this query block; rows that saw no allowed key have l == 0.
            seen = l > 0
            l_safe = torch.where(seen, l, torch.ones_like(l))
            lse = torch.where(seen, (m + torch.log2(l_safe)) * LN2, torch.full_like(l, float("-inf")))

            def put(name, x):
                # [B, Hkv, G*n, ...] -> rows qs:qe of res[name] [B, H, Nq, ...]
                res[name][:, :, qs:qe] = x.reshape(B, H, n, *x.shape[3:])

            if want_out:
                if reweight is not None:
                    p_row = _per_row(rw_p, Hkv, G, n).unsqueeze(-1)
                    a_mass, b_mass = ab_mass[..., 0:1], ab_mass[..., 1:2]
                    has_b = b_mass > 0
                    ratio = a_mass / torch.where(has_b, b_mass, torch.ones_like(b_mass))
                    corr = (p_row - 1) * a_vec + (1 - p_row) * ratio * b_vec
                    acc = acc + torch.where(has_b, corr, torch.zeros_like(corr))
                o = acc / l_safe.unsqueeze(-1)
                if head_scale is not None:
                    o = o * _per_row(head_scale, Hkv, G, n).unsqueeze(-1)
                put("out", o)
            if want_lse:
                put("lse", lse)
            if want_groups:
                put("group_mass", gm / l_safe.unsqueeze(-1))
            if want_match:
                put("match_mass", mm / l_safe.unsqueeze(-1))
            if want_top1:
                put("top1_index", best_i)
                # the top-1 score is m, so its weight is exp(0) / l, without lse's rounding
                put("top1_weight", torch.where(seen, 1 / l_safe, torch.zeros_like(l)))
            if want_entropy:
                h = torch.log(l_safe) - ent * LN2 / l_safe  # ent is in log2 units
                put("entropy", torch.where(seen, h.clamp_min(0), torch.zeros_like(l)))

    run_blocks(one_block, range(0, Nq, bq), dev)
    return res


def received(q, k, lse, *, qscale, masks, query_range, block_q=None, block_k=None):
    """Attention each key receives, summed over query rows in ``query_range``: float32 [B, H, Nk].

    Reuses ``lse`` [B, H, Nq]; loops over key blocks, and inside over the query
    blocks that can see them (the shape of FlashAttention's dK/dV loop).
    """
    B, H, Nq, d = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    G = H // Hkv
    bq, bk = default_blocks(B, H, Nq, block_q, block_k)
    f32 = torch.float32
    # Rows with no allowed key have lse = -inf; +inf makes every p there exactly 0.
    lse = torch.where(torch.isfinite(lse), lse.to(f32) * LOG2E, torch.full_like(lse, float("inf"), dtype=f32))
    rec = torch.zeros(B, H, Nk, dtype=f32, device=q.device)
    q0, q1 = query_range
    def one_block(ks):
            ke = min(ks + bk, Nk)
            kb = k[:, :, ks:ke].to(f32).transpose(-1, -2)
            lo, hi = masks.query_range(ks, ke, q0, q1)
            total = torch.zeros(B, Hkv, G, ke - ks, dtype=f32, device=q.device)
            for qs in range(lo, hi, bq):
                qe = min(qs + bq, hi)
                n = qe - qs
                s = torch.matmul(_prep_q(q, qs, qe, qscale, Hkv), kb)
                masks.apply(s, qs, qe, ks, ke)
                s.sub_(lse[:, :, qs:qe].reshape(B, Hkv, G * n, 1)).exp2_()  # masked: 2^(MASKED - lse) = 0
                total += s.view(B, Hkv, G, n, ke - ks).sum(3)
            rec[:, :, ks:ke] = total.view(B, H, ke - ks)

    run_blocks(one_block, range(0, Nk, bk), q.device)
    return rec
