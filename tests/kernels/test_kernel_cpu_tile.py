"""The compiled CPU tile step (headscope_kernels.cpu_tile) against the eager torch step and a dense
float64 reference; and the fallback to the eager step when no compiler works."""

import shutil

import pytest
import torch

from headscope_kernels import attention_with_stats, cpu_tile, reference
from kernel_dense_ref import ALL_OUTPUTS, assert_close, check_stats, dense, make_case

needs_compiler = pytest.mark.skipif(cpu_tile._compiler() is None, reason="no C++ compiler on this machine")


def alibi(H, Nq, Nk):
    """ALiBi bias [1, H, Nq, Nk] (Press et al. 2022): head h adds -m_h * (i - j), m_h = 2^(-8(h+1)/H)."""
    slopes = 2.0 ** (-8.0 * torch.arange(1, H + 1) / H)
    dist = (torch.arange(Nq)[:, None] + (Nk - Nq) - torch.arange(Nk)[None, :]).clamp_min(0)
    return (-slopes[:, None, None] * dist).unsqueeze(0)


CASES = {  # name: (make_case arguments, extra attention_with_stats arguments)
    "causal-pad-window": (dict(causal=True, pad=True, window=70, num_groups=3, match_channels=2), {}),
    "bool-mask": (dict(attn_mask="bool", num_groups=2), {}),
    "float-mask-peaky": (dict(attn_mask="float", num_groups=2, score_scale=4.0), {}),
    "softcap-alibi": (dict(causal=True, num_groups=2), dict(softcap=5.0, attn_mask="alibi")),
    "rows-without-keys": (dict(causal=True, q_offset=-3, pad=True, num_groups=2), {}),
    "edits": (dict(causal=True, num_groups=3), dict(uniform_heads=torch.tensor([True, False, False, True]),
                                                     reweight=(0, 1, 0.4), head_scale=torch.rand(4) * 2)),
}


def both_steps(monkeypatch, q, k, v, scale, **kw):
    """attention_with_stats with the compiled step, then with the eager one."""
    assert cpu_tile.kernel() is not None, "the compiled step did not build"
    fused = attention_with_stats(q, k, v, scale, backend="torch", **kw)
    with monkeypatch.context() as m:
        m.setenv("HEADSCOPE_CPU_KERNEL", "0")
        eager = attention_with_stats(q, k, v, scale, backend="torch", **kw)
    return fused, eager


@needs_compiler
@pytest.mark.parametrize("block_k", [None, 64, 100])  # 100: rows end in a partial vector
@pytest.mark.parametrize("name", list(CASES))
def test_compiled_step_equals_eager_and_dense(monkeypatch, name, block_k):
    args, extra = CASES[name]
    q, k, v, scale, kw = make_case(seed=len(name), B=2, H=4, Hkv=2, Nq=37, Nk=230, d=16, **args)
    kw.update(extra)
    if kw.get("attn_mask") == "alibi":
        kw["attn_mask"] = alibi(4, 37, 230)
    fused, eager = both_steps(monkeypatch, q, k, v, scale, outputs=ALL_OUTPUTS if "key_match_ids" in kw
                              else ALL_OUTPUTS[:-1], block_q=8, block_k=block_k, **kw)
    assert torch.equal(fused.top1_index, eager.top1_index)
    for field in ("lse", "group_mass", "top1_weight", "match_mass"):
        if getattr(eager, field) is not None:
            assert_close(getattr(fused, field), getattr(eager, field), 1e-6, field)
    assert_close(fused.entropy, eager.entropy, 2e-6, "entropy")
    assert_close(fused.out, eager.out, 2e-6, "out")
    if "softcap" not in kw:  # the dense reference has no softcap (test_kernel_softcap covers it)
        edits = {e: kw.pop(e) for e in ("uniform_heads", "reweight", "head_scale") if e in kw}
        ref = dense(q, k, v, scale, **kw, **edits)
        if edits:  # statistics stay those of the unedited attention
            ref = {**dense(q, k, v, scale, **kw), "out": ref["out"]}
        check_stats(fused, ref, groups=True)


@needs_compiler
def test_top1_ties_keep_the_first_key_within_and_across_tiles(monkeypatch):
    q, k, v, scale, kw = make_case(seed=16, B=1, H=4, Hkv=2, Nq=24, Nk=300, d=16)
    k[:, :, [75, 76, 200, 299]] = k[:, :, 70:71]  # the same key at 70 (first), in the same and later tiles
    q = k[:, :, 70:71].repeat_interleave(2, 1).expand(-1, -1, 24, -1) * 3
    for block_k in (64, 100, None):
        fused, eager = both_steps(monkeypatch, q, k, v, scale, outputs=("top1",), block_k=block_k)
        assert (fused.top1_index == 70).all() and torch.equal(fused.top1_index, eager.top1_index)


@needs_compiler
def test_compiled_exp2_matches_torch_and_flushes_tiny_weights_to_zero():
    width = 203  # 25 full vectors and a tail of 3
    g = torch.Generator().manual_seed(0)
    span = torch.linspace(-140, 0, width)  # 2^x from 1 down to far below fp32's normal range
    s = torch.stack([span[torch.randperm(width, generator=g)] for _ in range(4)])
    s[2, 17] = 3.0  # a row whose max is not 0
    s[3] = reference.MASKED  # a row with no allowed key
    m = torch.full((4,), reference.NEG)
    l, ent = torch.zeros(4), torch.zeros(4)
    best = torch.full((4,), -1, dtype=torch.int64)
    rows_max = s.amax(-1, keepdim=True)
    want = torch.exp2((s - rows_max).double())  # the shift in fp32, as both steps do it
    p = torch.empty_like(s)
    alpha, w = cpu_tile.softmax_step(cpu_tile.kernel(), s, p, m, l, ent, best, 1000, reference.NEG,
                                     reference.MASKED)
    live = want[:3] >= 2.0 ** -125
    rel = ((p[:3].double() - want[:3]).abs() / want[:3])[live]
    assert rel.max() < 2.5e-7, rel.max()                  # two ulp of fp32
    assert (p[:3][~live] == 0).all() and (p[3] == 0).all()  # below 2^-125, and masked keys: exactly 0
    assert torch.equal(best[:3], s[:3].argmax(-1) + 1000) and best[3] == -1
    assert torch.equal(m[:3], rows_max[:3, 0]) and m[3] == reference.NEG
    assert torch.allclose(l[:3], want[:3].sum(-1).float()) and l[3] == 0
    h = (want * (s - rows_max).double())[:3].sum(-1)  # sum p (s - max)
    assert torch.allclose(ent[:3], h.float()) and ent[3] == 0
    assert (alpha == 0).sum() == 3 and alpha[3] == 1 and w[3] == 0 and (w[:3] == 1).all()


@pytest.mark.parametrize("compiler", ["missing", "failing"])
def test_without_a_working_compiler_it_warns_once_and_runs_eager(monkeypatch, tmp_path, compiler):
    if compiler == "failing" and shutil.which("false") is None:
        pytest.skip("no `false` command")
    monkeypatch.setattr(cpu_tile, "_loaded", False)  # forget the kernel built in this process
    monkeypatch.setattr(cpu_tile, "_fn", None)
    monkeypatch.setenv("HEADSCOPE_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++") if compiler == "missing" else shutil.which("false"))
    q, k, v, scale, kw = make_case(seed=3, B=1, H=4, Hkv=2, Nq=20, Nk=90, d=8, causal=True, num_groups=2)
    with pytest.warns(RuntimeWarning, match="compiled CPU attention tile is unavailable") as caught:
        first = attention_with_stats(q, k, v, scale, outputs=ALL_OUTPUTS[:-1], backend="torch", **kw)
        attention_with_stats(q, k, v, scale, outputs=("out",), backend="torch", **kw)
    assert sum("unavailable" in str(w.message) for w in caught) == 1
    assert cpu_tile.kernel() is None and not list(tmp_path.glob("*.so"))
    check_stats(first, dense(q, k, v, scale, **kw))
    monkeypatch.setenv("HEADSCOPE_CPU_KERNEL", "0")  # the eager step itself gives the same numbers
    eager = attention_with_stats(q, k, v, scale, outputs=ALL_OUTPUTS[:-1], backend="torch", **kw)
    for field, x in vars(first).items():
        assert (x is None and getattr(eager, field) is None) or torch.equal(x, getattr(eager, field)), field


@pytest.mark.slow  # torch.compile builds the step on first use (minutes on a loaded 2-core machine)
def test_torch_compiled_eager_step_equals_the_cpp_tile_and_dense(monkeypatch):
    """The alternative the CPU tile benchmark measures (reference.CPU_STEP = "compile": torch.compile of
    softmax_step_eager) computes what the C++ tile and the dense float64 reference compute."""
    q, k, v, scale, kw = make_case(seed=3, B=2, H=4, Hkv=2, Nq=37, Nk=230, d=16, causal=True, pad=True, window=70,
                                   num_groups=3)
    outputs = ALL_OUTPUTS[:-1]
    cpp = attention_with_stats(q, k, v, scale, backend="torch", outputs=outputs, block_q=8, block_k=64, **kw)
    monkeypatch.setattr(reference, "CPU_STEP", "compile")
    compiled = attention_with_stats(q, k, v, scale, backend="torch", outputs=outputs, block_q=8, block_k=64, **kw)
    assert torch.equal(compiled.top1_index, cpp.top1_index)
    for field in ("out", "lse", "group_mass", "top1_weight", "entropy"):
        assert_close(getattr(compiled, field), getattr(cpp, field), 2e-6, field)
    check_stats(compiled, dense(q, k, v, scale, **kw), groups=True)
