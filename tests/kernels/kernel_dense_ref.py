"""Dense float64 attention reference for the kernel tests (small sizes only)."""

import torch


def allowed_mask(B, H, Nq, Nk, *, causal=False, q_offset=None, key_padding_mask=None,
                 attn_mask=None, sliding_window=None):
    """Bool [B, H, Nq, Nk] of allowed (query, key) pairs, plus the additive float mask (or None)."""
    if q_offset is None:
        q_offset = Nk - Nq
    pos = torch.arange(Nq)[:, None] + q_offset
    key = torch.arange(Nk)[None, :]
    allow = torch.ones(B, H, Nq, Nk, dtype=torch.bool)
    if causal:
        allow &= key <= pos
    if sliding_window is not None:
        allow &= (pos - key) < sliding_window
    if key_padding_mask is not None:
        allow &= key_padding_mask[:, None, None, :]
    add = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allow &= attn_mask
        else:
            add = attn_mask.double().expand(B, H, Nq, Nk)
    return allow, add


def match_matrix(key_ids, query_ids, B, Nq, Nk):
    """Bool [C, B, Nq, Nk]: key id of j == query id of i, and the id is >= 0."""
    kid = (key_ids if key_ids.dim() == 3 else key_ids[None]).expand(-1, B, Nk)
    qid = (query_ids if query_ids.dim() == 3 else query_ids[None]).expand(-1, B, Nq)
    return (qid[..., :, None] == kid[..., None, :]) & (kid >= 0)[..., None, :]


def _softmax(s):
    """Row softmax that gives 0 (not NaN) on rows with every score -inf."""
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    z = e.sum(-1, keepdim=True)
    return e / torch.where(z > 0, z, torch.ones_like(z))


def dense(q, k, v, scaling, *, causal=False, q_offset=None, key_padding_mask=None, attn_mask=None,
          sliding_window=None, key_groups=None, num_groups=0, key_match_ids=None, query_match_ids=None,
          head_scale=None, uniform_heads=None, reweight=None):
    """Everything attention_with_stats returns, computed densely in float64."""
    B, H, Nq, d = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    G = H // Hkv
    kd = k.double().repeat_interleave(G, dim=1)
    vd = v.double().repeat_interleave(G, dim=1)
    allow, add = allowed_mask(B, H, Nq, Nk, causal=causal, q_offset=q_offset,
                              key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                              sliding_window=sliding_window)

    def scores(qq):
        s = qq.double() @ kd.transpose(-1, -2) * scaling
        if add is not None:
            s = s + add
        return s.masked_fill(~allow, float("-inf"))

    s = scores(q)
    p = _softmax(s)
    lse = torch.logsumexp(s, -1)
    res = {"scores": s, "probs": p, "lse": lse}
    res["entropy"] = -torch.where(p > 0, p * torch.log(p), torch.zeros_like(p)).sum(-1)
    res["top1_weight"] = p.amax(-1)
    idx = s.argmax(-1)
    res["top1_index"] = torch.where(torch.isfinite(lse), idx, torch.full_like(idx, -1))
    onehot = None
    if key_groups is not None:
        kg = key_groups if key_groups.dim() == 2 else key_groups.expand(B, Nk)
        onehot = (kg[..., None] == torch.arange(num_groups)).double()  # [B, Nk, ng]
        res["group_mass"] = p @ onehot[:, None]
    if key_match_ids is not None:
        res["match_mass"] = torch.einsum("bhij,cbij->bhic", p, match_matrix(key_match_ids, query_match_ids,
                                                                            B, Nq, Nk).double())

    pe = p
    if uniform_heads is not None:
        pu = _softmax(scores(torch.zeros_like(q)))
        pe = torch.where(uniform_heads[None, :, None, None], pu, p)
    if reweight is not None:
        ga, gb, pw = reweight
        pw = torch.as_tensor(pw, dtype=torch.float64).expand(H)[None, :, None, None]
        in_a = onehot[:, None, None, :, ga]
        in_b = onehot[:, None, None, :, gb]
        wa = (pe * in_a).sum(-1, keepdim=True)
        wb = (pe * in_b).sum(-1, keepdim=True)
        moved = pe * in_a * (pw - 1) + pe * in_b * (1 - pw) * wa / torch.where(wb > 0, wb, 1.0)
        pe = pe + torch.where(wb > 0, moved, torch.zeros_like(moved))
    out = pe @ vd
    if head_scale is not None:
        out = out * torch.as_tensor(head_scale, dtype=torch.float64)[None, :, None, None]
    res["out"] = out
    res["edited_probs"] = pe
    return res


# --------------------------------------------------------------------------- cases

ALL_OUTPUTS = ("out", "lse", "group_mass", "top1", "entropy", "match_mass")
MATCH_FORMS = ("CBN", "BN", "C1N")


def make_case(*, seed, B, H, Hkv, Nq, Nk, d, causal=False, q_offset=None, pad=False,
              window=None, num_groups=0, per_batch_groups=False, attn_mask=None,
              dtype=torch.float32, score_scale=1.0, match_channels=0, match_form="CBN"):
    """Random inputs and keyword arguments for attention_with_stats.

    match_channels > 0 adds match ids: channel 0 previous-token (key id = j, query id =
    position - 1, negative before key 0), the others random ids in [-2, 3] (many matches,
    some negative ids). match_form: "CBN" [C, B, N], "BN" [B, N] (one channel), "C1N"
    [C, 1, N] (broadcast over the batch).
    """
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, H, Nq, d, generator=g) * score_scale).to(dtype)
    k = torch.randn(B, Hkv, Nk, d, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Nk, d, generator=g).to(dtype)
    kw = dict(causal=causal, q_offset=q_offset, sliding_window=window)
    if pad:
        kpm = torch.rand(B, Nk, generator=g) > 0.3
        kpm[0, :] = True
        kw["key_padding_mask"] = kpm
    if num_groups:
        shape = (B, Nk) if per_batch_groups else (Nk,)
        kw["key_groups"] = torch.randint(-1, num_groups, shape, generator=g)
        kw["num_groups"] = num_groups
    if attn_mask == "bool":
        kw["attn_mask"] = torch.rand(1, H, Nq, Nk, generator=g) > 0.2
    elif attn_mask == "float":
        m = torch.zeros(B, 1, Nq, Nk)
        m[torch.rand(B, 1, Nq, Nk, generator=g) < 0.2] = float("-inf")
        kw["attn_mask"] = m
    if match_channels:
        Bm = 1 if match_form == "C1N" else B
        C = 1 if match_form == "BN" else match_channels
        qo = Nk - Nq if q_offset is None else q_offset
        kid = torch.randint(-2, 4, (C, Bm, Nk), generator=g)
        qid = torch.randint(-2, 4, (C, Bm, Nq), generator=g)
        kid[0] = torch.arange(Nk)
        qid[0] = torch.arange(Nq) + qo - 1
        kw["key_match_ids"], kw["query_match_ids"] = (kid[0], qid[0]) if match_form == "BN" else (kid, qid)
    return q, k, v, d ** -0.5, kw


def without_match(kw):
    """kw minus the match ids (for attention_received, which has none)."""
    return {n: x for n, x in kw.items() if n not in ("key_match_ids", "query_match_ids")}


def assert_close(got, want, tol, what):
    """max |got - want| <= tol * max(1, max |want|), ignoring positions where want is -inf."""
    got, want = got.double(), want.double()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert not torch.isnan(got).any(), f"{what}: NaN"
    inf = torch.isinf(want)
    assert torch.equal(torch.isinf(got), inf), f"{what}: infinities differ"
    err = (got - want).abs()[~inf]
    scale = max(1.0, want[~inf].abs().max().item()) if (~inf).any() else 1.0
    worst = err.max().item() if err.numel() else 0.0
    assert worst <= tol * scale, f"{what}: max error {worst:.3g} > {tol:.1g} * {scale:.3g}"


def received_tol(ref):
    """Tolerance for attention received: p = exp(s - lse) carries fp32 rounding of s and lse,
    about 4 ulp of the largest |score| per unit of probability."""
    s = ref["scores"]
    s = s[torch.isfinite(s)]
    smax = s.abs().max().item() if s.numel() else 0.0
    return max(1e-6, 4 * torch.finfo(torch.float32).eps * smax)


def check_stats(st, ref, *, tol_out=1e-5, tol_stat=1e-6, tol_ent=1e-5, groups=True):
    """Compare every statistic of an AttentionStats to the dense reference."""
    assert_close(st.out, ref["out"], tol_out, "out")
    assert_close(st.lse, ref["lse"], tol_stat, "lse")
    if groups:
        assert_close(st.group_mass, ref["group_mass"], tol_stat, "group_mass")
    if "match_mass" in ref:
        assert_close(st.match_mass, ref["match_mass"], tol_stat, "match_mass")
    assert_close(st.entropy, ref["entropy"], tol_ent, "entropy")
    assert_close(st.top1_weight, ref["top1_weight"], tol_stat, "top1_weight")
    # top-1 index: identical, except where the dense row has a near-tie at the top.
    p = ref["probs"]
    idx = st.top1_index
    empty = ~torch.isfinite(ref["lse"])
    assert torch.equal(idx[empty], torch.full_like(idx[empty], -1)), "top1_index on empty rows"
    got_p = p.gather(-1, idx.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    gap = (got_p - ref["top1_weight"]).abs()[~empty]
    assert gap.numel() == 0 or gap.max().item() <= tol_stat, "top1_index is not a maximal key"
    if p.shape[-1] >= 2:
        top2 = p.topk(2, dim=-1).values
        clear = (top2[..., 0] - top2[..., 1] > 1e-4) & ~empty
        assert torch.equal(idx[clear], ref["top1_index"][clear]), "top1_index differs"


def case_strategy(st, *, max_n=40, max_d=16, min_block=2, max_block=16):
    """Hypothesis strategy of make_case keyword arguments plus block sizes."""

    @st.composite
    def cases(draw):
        Hkv = draw(st.integers(1, 2))
        Nq = draw(st.integers(1, max_n))
        Nk = draw(st.integers(1, max_n))
        causal = draw(st.booleans())
        return dict(
            seed=draw(st.integers(0, 2**31 - 1)),
            B=draw(st.integers(1, 2)), Hkv=Hkv, H=Hkv * draw(st.integers(1, 3)),
            Nq=Nq, Nk=Nk, d=draw(st.sampled_from([d for d in (4, 8, 16) if d <= max_d])),
            causal=causal,
            q_offset=draw(st.one_of(st.none(), st.integers(-3, Nk))),
            pad=draw(st.booleans()),
            window=draw(st.one_of(st.none(), st.integers(1, Nk + 2))),
            num_groups=draw(st.integers(1, 4)),
            per_batch_groups=draw(st.booleans()),
            score_scale=draw(st.sampled_from([1.0, 4.0])),
            match_channels=draw(st.integers(1, 3)),
            match_form=draw(st.sampled_from(MATCH_FORMS)),
        ), dict(block_q=draw(st.integers(min_block, max_block)),
                block_k=draw(st.integers(min_block, max_block)))

    return cases()
