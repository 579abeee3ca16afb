"""The torch backend of headscope_kernels against a dense float64 reference."""

import os

import pytest
import torch
from hypothesis import given, settings, HealthCheck, strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from headscope_kernels import attention_received, attention_with_stats
from kernel_dense_ref import (ALL_OUTPUTS, assert_close, case_strategy, check_stats, dense, make_case,
                              received_tol, without_match)

# HEADSCOPE_KERNEL_EXAMPLES=500 for a longer hunt.
SETTINGS = settings(max_examples=int(os.environ.get("HEADSCOPE_KERNEL_EXAMPLES", 50)), deadline=None,
                    database=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(case_strategy(st))
def test_stats_match_dense(case):
    params, blocks = case
    q, k, v, scale, kw = make_case(**params)
    st_ = attention_with_stats(q, k, v, scale, outputs=ALL_OUTPUTS, backend="torch", **kw, **blocks)
    check_stats(st_, dense(q, k, v, scale, **kw))


@SETTINGS
@given(case_strategy(st), st.sampled_from(["bool", "float"]))
def test_attn_mask_matches_dense(case, kind):
    params, blocks = case
    q, k, v, scale, kw = make_case(**params, attn_mask=kind)
    st_ = attention_with_stats(q, k, v, scale, outputs=ALL_OUTPUTS, backend="torch", **kw, **blocks)
    check_stats(st_, dense(q, k, v, scale, **kw))


@SETTINGS
@given(case_strategy(st), st.data())
def test_received_matches_dense(case, data):
    params, blocks = case
    q, k, v, scale, kw = make_case(**params)
    kw.pop("key_groups", None), kw.pop("num_groups", None)
    kw = without_match(kw)
    Nq = q.shape[2]
    start = data.draw(st.integers(0, Nq))
    stop = data.draw(st.integers(start, Nq))
    ref = dense(q, k, v, scale, **kw)
    want = ref["probs"][:, :, start:stop].sum(2)
    lse = data.draw(st.sampled_from([None, "given"]))
    if lse == "given":
        lse = attention_with_stats(q, k, v, scale, outputs=("lse",), backend="torch", **kw).lse
    got = attention_received(q, k, scale, lse, query_range=(start, stop), backend="torch", **kw, **blocks)
    assert got.dtype == torch.float32
    assert_close(got, want, received_tol(ref), "received")


@SETTINGS
@given(case_strategy(st), st.data())
def test_fused_edits_match_dense(case, data):
    params, blocks = case
    q, k, v, scale, kw = make_case(**params)
    H, ng = q.shape[1], kw["num_groups"]
    edits = {}
    if data.draw(st.booleans()):
        edits["head_scale"] = torch.rand(H) * 2
    if data.draw(st.booleans()):
        edits["uniform_heads"] = torch.rand(H) < 0.5
    if data.draw(st.booleans()):
        ga, gb = data.draw(st.integers(0, ng - 1)), data.draw(st.integers(0, ng - 1))
        p = data.draw(st.sampled_from(["scalar", "tensor"]))
        p = 0.3 if p == "scalar" else torch.rand(H) * 1.5
        edits["reweight"] = (ga, gb, p)
    outputs = data.draw(st.sampled_from([("out",), ALL_OUTPUTS]))
    st_ = attention_with_stats(q, k, v, scale, outputs=outputs, backend="torch", **kw, **edits, **blocks)
    ref = dense(q, k, v, scale, **kw, **edits)
    assert_close(st_.out, ref["out"], 1e-5, "edited out")
    if outputs == ALL_OUTPUTS:  # statistics stay those of the unedited attention
        check_stats(st_, {**ref, "out": st_.out})
    else:
        assert st_.lse is None and st_.entropy is None and st_.group_mass is None


def test_reweight_without_b_mass_leaves_rows_unchanged():
    q, k, v, scale, _ = make_case(seed=1, B=1, H=2, Hkv=1, Nq=6, Nk=10, d=8)
    groups = torch.tensor([0, 0, 1, 1, -1, -1, 2, 2, 2, 2])
    # Causal with Nq == Nk: rows 0-5 see keys 0..i only; group 2 (keys 6-9) is never visible.
    kw = dict(causal=True, q_offset=0, key_groups=groups, num_groups=3)
    plain = attention_with_stats(q, k, v, scale, backend="torch", **kw).out
    moved = attention_with_stats(q, k, v, scale, backend="torch", reweight=(0, 2, 0.0), **kw).out
    assert torch.equal(plain, moved)
    # With a reachable group B the rows do change (rows 2+ see group 1).
    moved = attention_with_stats(q, k, v, scale, backend="torch", reweight=(0, 1, 0.0), **kw).out
    ref = dense(q, k, v, scale, reweight=(0, 1, 0.0), **kw)
    assert_close(moved, ref["out"], 1e-5, "reweight")
    assert not torch.allclose(moved[:, :, 2:], plain[:, :, 2:])
    assert torch.equal(moved[:, :, :2], plain[:, :, :2])   # rows 0-1 see no group-1 key


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 4e-3)])
def test_low_precision_inputs(dtype, tol):
    q, k, v, scale, kw = make_case(seed=3, B=2, H=4, Hkv=2, Nq=33, Nk=47, d=16, causal=True,
                                   pad=True, window=20, num_groups=3, dtype=dtype, match_channels=2)
    st_ = attention_with_stats(q, k, v, scale, outputs=ALL_OUTPUTS, backend="torch", block_q=8,
                               block_k=16, **kw)
    assert st_.out.dtype == dtype and st_.lse.dtype == torch.float32
    ref = dense(q, k, v, scale, **kw)  # fp64 from the same (rounded) inputs
    assert_close(st_.out, ref["out"], tol, "out")
    # statistics are accumulated in fp32 from the rounded inputs, so they stay tight
    assert_close(st_.lse, ref["lse"], 1e-5, "lse")
    assert_close(st_.group_mass, ref["group_mass"], 1e-5, "group_mass")
    assert_close(st_.match_mass, ref["match_mass"], 1e-5, "match_mass")
    assert_close(st_.entropy, ref["entropy"], 1e-4, "entropy")


def test_rows_without_keys_are_zero_not_nan():
    B, H, Hkv, Nq, Nk, d = 2, 2, 1, 5, 7, 4
    q, k, v, scale, _ = make_case(seed=4, B=B, H=H, Hkv=Hkv, Nq=Nq, Nk=Nk, d=d)
    kpm = torch.ones(B, Nk, dtype=torch.bool)
    kpm[1] = False                      # batch 1 is all padding
    # causal with q_offset=-2: rows 0 and 1 come before key 0
    st_ = attention_with_stats(q, k, v, scale, causal=True, q_offset=-2, key_padding_mask=kpm,
                               key_groups=torch.zeros(Nk, dtype=torch.long), num_groups=1,
                               key_match_ids=torch.zeros(Nk, dtype=torch.long).expand(B, Nk),
                               query_match_ids=torch.zeros(Nq, dtype=torch.long).expand(B, Nq),
                               outputs=ALL_OUTPUTS, backend="torch", block_q=2, block_k=3)
    empty = torch.zeros(B, H, Nq, dtype=torch.bool)
    empty[1] = True
    empty[:, :, :2] = True
    for name in ("out", "lse", "group_mass", "top1_weight", "entropy", "match_mass"):
        assert not torch.isnan(getattr(st_, name)).any(), name
    assert (st_.out[empty] == 0).all() and (st_.match_mass[empty] == 0).all()
    assert torch.allclose(st_.match_mass[~empty], torch.ones(1))  # every id matches
    assert (st_.lse[empty] == float("-inf")).all() and torch.isfinite(st_.lse[~empty]).all()
    assert (st_.group_mass[empty] == 0).all()
    assert torch.allclose(st_.group_mass[~empty], torch.ones(1))
    assert (st_.top1_index[empty] == -1).all() and (st_.top1_index[~empty] >= 0).all()
    assert (st_.top1_weight[empty] == 0).all() and (st_.entropy[empty] == 0).all()
    rec = attention_received(q, k, scale, causal=True, q_offset=-2, key_padding_mask=kpm,
                             backend="torch")
    assert not torch.isnan(rec).any() and (rec[1] == 0).all()


def test_defaults_are_bottom_right_aligned_and_outputs_optional():
    q, k, v, scale, _ = make_case(seed=5, B=1, H=2, Hkv=2, Nq=4, Nk=9, d=8)
    a = attention_with_stats(q, k, v, scale, causal=True, outputs=("out", "lse"), backend="torch")
    b = attention_with_stats(q, k, v, scale, causal=True, q_offset=5, outputs=("out", "lse"), backend="torch")
    assert torch.equal(a.out, b.out) and torch.equal(a.lse, b.lse)
    assert a.group_mass is None and a.top1_index is None and a.entropy is None
    assert_close(a.out, dense(q, k, v, scale, causal=True)["out"], 1e-5, "out")
    only = attention_with_stats(q, k, v, scale, outputs="lse", backend="torch")
    assert only.out is None and only.lse.shape == (1, 2, 4)


def test_worker_threads_give_identical_results():
    q, k, v, scale, kw = make_case(seed=9, B=1, H=4, Hkv=2, Nq=64, Nk=64, d=8, causal=True, num_groups=2,
                                   match_channels=2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = attention_with_stats(q, k, v, scale, outputs=ALL_OUTPUTS, block_q=8, block_k=16, **kw)
        torch.set_num_threads(3)
        many = attention_with_stats(q, k, v, scale, outputs=ALL_OUTPUTS, block_q=8, block_k=16, **kw)
        assert torch.get_num_threads() == 3  # restored after the worker threads
    finally:
        torch.set_num_threads(threads)
    for name, x in vars(one).items():
        assert torch.equal(x, getattr(many, name)), name


def test_auto_backend_on_cpu_uses_torch():
    q, k, v, scale, kw = make_case(seed=6, B=1, H=2, Hkv=1, Nq=8, Nk=8, d=8, causal=True)
    a = attention_with_stats(q, k, v, scale, outputs=("out", "lse"), **kw)
    b = attention_with_stats(q, k, v, scale, outputs=("out", "lse"), backend="torch", **kw)
    assert torch.equal(a.out, b.out) and torch.equal(a.lse, b.lse)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_never_materialises_the_attention_pattern():
    B, H, Hkv, N, d, bq, bk = 1, 4, 2, 256, 8, 32, 32
    q, k, v, scale, kw = make_case(seed=7, B=B, H=H, Hkv=Hkv, Nq=N, Nk=N, d=d, causal=True,
                                   pad=True, num_groups=3, match_channels=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # dispatch modes are per thread: keep every tile on this one
    try:
        with _LargestTensor() as rec:
            attention_with_stats(q, k, v, scale, outputs=ALL_OUTPUTS, block_q=bq, block_k=bk,
                                 uniform_heads=torch.tensor([True, False, False, False]),
                                 reweight=(0, 1, 0.5), head_scale=torch.ones(H), backend="torch", **kw)
            kw.pop("key_groups"), kw.pop("num_groups")
            attention_received(q, k, scale, block_q=bq, block_k=bk, backend="torch", **without_match(kw))
    finally:
        torch.set_num_threads(threads)
    tile, inputs = B * H * bq * bk, B * H * N * d
    assert rec.largest >= tile            # the tiles were seen...
    assert rec.largest <= max(tile, inputs), rec.largest
    assert rec.largest < H * N * N // 16  # ...and nothing near the [H, N, N] pattern


@pytest.mark.parametrize("block_k", [64, 128, 100])
def test_top1_index_search_over_wide_tiles(block_k):
    """Tiles as wide as a chunk multiple use the chunked index search; ties keep the first key."""
    q, k, v, scale, kw = make_case(seed=16, B=1, H=4, Hkv=2, Nq=40, Nk=300, d=16, causal=True,
                                   q_offset=260, pad=True, num_groups=2, match_channels=2)
    kw["key_padding_mask"][:] = True
    st_ = attention_with_stats(q, k, v, scale, outputs=ALL_OUTPUTS, backend="torch", block_q=8,
                               block_k=block_k, **kw)
    check_stats(st_, dense(q, k, v, scale, **kw))
    # Exact ties: the same key at 70, 75 and 200 (other chunks and tiles), aligned with every query.
    k[:, :, [75, 200]] = k[:, :, 70:71]
    q = k[:, :, 70:71].repeat_interleave(2, 1).expand(-1, -1, 40, -1) * 3
    st_ = attention_with_stats(q, k, v, scale, outputs=("top1",), backend="torch", block_q=8,
                               block_k=block_k, **kw)
    assert (st_.top1_index == 70).all()
