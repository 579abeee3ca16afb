"""The Triton backend against the dense float64 reference.

On a GPU the kernels run compiled, in this process. Without one they run in
Triton's interpreter, which must be switched on (TRITON_INTERPRET=1) before
triton is first imported; so on CPU this file re-runs itself in a fresh
subprocess with that variable set, and the in-process copies are skipped.
The interpreter is slow: sizes stay tiny.
"""

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

triton = pytest.importorskip("triton")

from headscope_kernels import attention_received, attention_with_stats  # noqa: E402
from kernel_dense_ref import (ALL_OUTPUTS, assert_close, case_strategy, check_stats, dense,  # noqa: E402
                              make_case, received_tol, without_match)

SETTINGS = settings(max_examples=int(os.environ.get("HEADSCOPE_KERNEL_EXAMPLES", 50)) // 5,
                    deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
CUDA = torch.cuda.is_available()
CHILD = os.environ.get("HEADSCOPE_TRITON_CHILD") == "1"
here = pytest.mark.skipif(not (CUDA or CHILD),
                          reason="runs in the interpreter subprocess (test_triton_interpreter_suite)")


@pytest.mark.skipif(CUDA or CHILD, reason="on a GPU the tests run in this process")
def test_triton_interpreter_suite():
    env = dict(os.environ, TRITON_INTERPRET="1", HEADSCOPE_TRITON_CHILD="1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    run = subprocess.run([sys.executable, "-m", "pytest", os.path.abspath(__file__), "-q",
                          "-p", "no:cacheprovider"], cwd=root, env=env, capture_output=True,
                         text=True, timeout=600)
    tail = (run.stdout + run.stderr)[-6000:]
    assert run.returncode == 0, tail
    summary = run.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, tail


@here
def test_interpreter_is_on():
    import headscope_kernels.triton_attention as mod

    assert CUDA or mod.INTERPRETED


def dev(*tensors):
    return [t.cuda() for t in tensors] if CUDA else list(tensors)


def on_device(kw):
    return {n: (x.cuda() if CUDA and isinstance(x, torch.Tensor) else x) for n, x in kw.items()}


def cpu(st_):
    for name, x in vars(st_).items():
        if isinstance(x, torch.Tensor):
            setattr(st_, name, x.cpu())
    return st_


@here
@SETTINGS
@given(case_strategy(st, max_n=24))
def test_triton_stats_match_dense(case):
    params, blocks = case
    q, k, v, scale, kw = make_case(**params)
    st_ = attention_with_stats(*dev(q, k, v), scale, outputs=ALL_OUTPUTS, backend="triton",
                               **on_device(kw), **blocks)
    check_stats(cpu(st_), dense(q, k, v, scale, **kw))


@here
@SETTINGS
@given(case_strategy(st, max_n=24), st.data())
def test_triton_received_matches_dense(case, data):
    params, blocks = case
    q, k, v, scale, kw = make_case(**params)
    kw.pop("key_groups"), kw.pop("num_groups")
    kw = without_match(kw)
    Nq = q.shape[2]
    start = data.draw(st.integers(0, Nq))
    stop = data.draw(st.integers(start, Nq))
    ref = dense(q, k, v, scale, **kw)
    got = attention_received(*dev(q, k), scale, query_range=(start, stop), backend="triton",
                             **on_device(kw), **blocks).cpu()
    assert_close(got, ref["probs"][:, :, start:stop].sum(2), received_tol(ref), "received")


@here
@SETTINGS
@given(case_strategy(st, max_n=24), st.data())
def test_triton_fused_edits_match_dense(case, data):
    params, blocks = case
    q, k, v, scale, kw = make_case(**params)
    H, ng = q.shape[1], kw["num_groups"]
    edits = dict(head_scale=torch.rand(H) * 2, uniform_heads=torch.rand(H) < 0.5,
                 reweight=(data.draw(st.integers(0, ng - 1)), data.draw(st.integers(0, ng - 1)),
                           torch.rand(H) * 1.5))
    st_ = attention_with_stats(*dev(q, k, v), scale, outputs=("out", "lse"), backend="triton",
                               **on_device(kw), **on_device(edits), **blocks)
    ref = dense(q, k, v, scale, **kw, **edits)
    assert_close(st_.out.cpu(), ref["out"], 1e-5, "edited out")
    assert_close(st_.lse.cpu(), ref["lse"], 1e-6, "lse (unedited)")


@here
def test_triton_agrees_with_torch_backend():
    q, k, v, scale, kw = make_case(seed=11, B=2, H=4, Hkv=2, Nq=19, Nk=23, d=16, causal=True,
                                   pad=True, window=12, num_groups=3, match_channels=3)
    a = cpu(attention_with_stats(*dev(q, k, v), scale, outputs=ALL_OUTPUTS, backend="triton",
                                 block_q=8, block_k=8, **on_device(kw)))
    b = attention_with_stats(q, k, v, scale, outputs=ALL_OUTPUTS, backend="torch", **kw)
    assert torch.equal(a.top1_index, b.top1_index)
    for name in ("out", "lse", "group_mass", "top1_weight", "entropy", "match_mass"):
        assert_close(getattr(a, name), getattr(b, name), 2e-6, name)


@here
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 4e-3)])
def test_triton_low_precision(dtype, tol):
    q, k, v, scale, kw = make_case(seed=12, B=1, H=2, Hkv=1, Nq=16, Nk=24, d=16, causal=True,
                                   num_groups=2, dtype=dtype, match_channels=2)
    st_ = cpu(attention_with_stats(*dev(q, k, v), scale, outputs=ALL_OUTPUTS, backend="triton",
                                   block_q=8, block_k=8, **on_device(kw)))
    assert st_.out.dtype == dtype
    ref = dense(q, k, v, scale, **kw)
    assert_close(st_.out, ref["out"], tol, "out")
    assert_close(st_.lse, ref["lse"], 1e-5, "lse")
    assert_close(st_.group_mass, ref["group_mass"], 1e-3, "group_mass")
    assert_close(st_.match_mass, ref["match_mass"], 1e-3, "match_mass")


@here
def test_triton_rows_without_keys():
    q, k, v, scale, _ = make_case(seed=13, B=2, H=2, Hkv=1, Nq=5, Nk=7, d=4)
    kpm = torch.ones(2, 7, dtype=torch.bool)
    kpm[1] = False
    kw = dict(causal=True, q_offset=-2, key_padding_mask=kpm,
              key_groups=torch.zeros(7, dtype=torch.long), num_groups=1,
              key_match_ids=torch.zeros(2, 7, dtype=torch.long),
              query_match_ids=torch.zeros(2, 5, dtype=torch.long))
    st_ = cpu(attention_with_stats(*dev(q, k, v), scale, outputs=ALL_OUTPUTS, backend="triton",
                                   block_q=4, block_k=4, **on_device(kw)))
    empty = torch.zeros(2, 2, 5, dtype=torch.bool)
    empty[1] = True
    empty[:, :, :2] = True
    for name in ("out", "group_mass", "top1_weight", "entropy", "match_mass"):
        x = getattr(st_, name)
        assert not torch.isnan(x).any() and (x[empty] == 0).all(), name
    assert (st_.lse[empty] == float("-inf")).all() and (st_.top1_index[empty] == -1).all()
    assert torch.isfinite(st_.lse[~empty]).all()
    kw.pop("key_groups"), kw.pop("num_groups")
    rec = attention_received(*dev(q, k), scale, backend="triton", block_q=4, block_k=4,
                             **on_device(without_match(kw))).cpu()
    assert not torch.isnan(rec).any() and (rec[1] == 0).all() and rec[0].sum() > 0


@here
def test_triton_match_channel_cap():
    import headscope_kernels as hk

    C = hk.TRITON_MAX_CHANNELS + 1
    q, k, v, scale, kw = make_case(seed=15, B=1, H=2, Hkv=1, Nq=4, Nk=6, d=4, causal=True,
                                   match_channels=C)
    q, k, v = dev(q, k, v)
    kw = on_device(kw)
    with pytest.raises(ValueError, match="match channels"):
        attention_with_stats(q, k, v, scale, outputs=("match_mass",), backend="triton", **kw)
    got = attention_with_stats(q, k, v, scale, outputs=("match_mass",), backend="auto", **kw)
    ref = dense(q.cpu(), k.cpu(), v.cpu(), scale, **{n: x.cpu() if isinstance(x, torch.Tensor) else x
                                                     for n, x in kw.items()})
    assert_close(got.match_mass.cpu(), ref["match_mass"], 1e-6, "match_mass")


@here
def test_triton_attn_mask_is_refused_but_auto_falls_back():
    q, k, v, scale, kw = make_case(seed=14, B=1, H=2, Hkv=1, Nq=4, Nk=4, d=4, attn_mask="bool")
    q, k, v = dev(q, k, v)
    kw = on_device(kw)
    with pytest.raises(ValueError, match="attn_mask"):
        attention_with_stats(q, k, v, scale, backend="triton", **kw)
    out = attention_with_stats(q, k, v, scale, backend="auto", **kw).out  # torch path
    assert_close(out.cpu(), dense(q.cpu(), k.cpu(), v.cpu(), scale,
                                  **{n: x.cpu() if isinstance(x, torch.Tensor) else x
                                     for n, x in kw.items()})["out"], 1e-5, "out")


def _compile_for_sm90(kernel, dtype, flags, blocks):
    """Compile one specialisation to a cubin for sm_90 (no GPU needed; checks compiled-mode rules)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ptr = dict(Q=f"*{dtype}", K=f"*{dtype}", V=f"*{dtype}", OUT=f"*{dtype}", KPM="*i8", GID="*i32", GTILES="*i32",
               TOPI="*i64", KMID="*i64", QMID="*i64")
    consts = dict(flags, PREC="ieee" if dtype == "fp32" else "tf32", UPCAST=False, **blocks)
    fp32_ptrs = {"QSCALE", "HSCALE", "RWP", "LSE", "GMASS", "TOPW", "ENT", "REC", "MMASS"}
    sig = {n: "constexpr" if n in consts else ptr.get(n, "*fp32" if n in fp32_ptrs else "i32")
           for n in kernel.arg_names}
    return triton.compile(ASTSource(kernel, sig, consts), target=GPUTarget("cuda", 90, 32))


FWD_FLAGS = ("CAUSAL", "HAS_WINDOW", "HAS_PAD", "WANT_OUT", "WANT_LSE", "WANT_GROUPS", "WANT_TOP1",
             "WANT_ENT", "WANT_MATCH", "REWEIGHT", "HEAD_SCALE")


def _compile_cases(dtypes):
    import headscope_kernels.triton_attention as mod

    if mod.INTERPRETED:
        pytest.skip("kernels were loaded in interpreter mode")
    for dtype in dtypes:
        for on in (True, False):
            fwd = {f: on for f in FWD_FLAGS}
            fwd["WANT_OUT"] = True
            k1 = _compile_for_sm90(mod._fwd_kernel, dtype, fwd,
                                   dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=64, BLOCK_G=16, NUM_C=3,
                                        BLOCK_C=4))
            k2 = _compile_for_sm90(mod._received_kernel, dtype,
                                   dict(CAUSAL=on, HAS_WINDOW=on, HAS_PAD=on),
                                   dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=64))
            assert k1.asm["cubin"] and k2.asm["cubin"]



@pytest.mark.skipif(CHILD, reason="compiled-mode check runs in the parent process")
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
def test_kernels_compile_for_gpu():
    """Without a GPU the interpreter cannot catch compiled-mode errors; compiling to a cubin does."""
    _compile_cases(["bf16", "fp16", "fp32"])
