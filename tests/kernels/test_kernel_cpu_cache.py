"""The compiled CPU tile's build cache trusts only what it built, and its ctypes boundary checks
every tensor before a pointer crosses into C++."""

import os
import stat
import subprocess
import sys

import pytest
import torch

from headscope_kernels import cpu_tile, reference

needs_compiler = pytest.mark.skipif(cpu_tile._compiler() is None, reason="no C++ compiler on this machine")


def run_step(fn):
    """One tile through ``fn``: p must be 2^(s - rowmax), the thing a foreign library would get wrong."""
    s = torch.tensor([[0.0, -1.0, -2.0, 1.0, 0.5, -3.0, -4.0, -5.0, -6.0]])
    m, l = torch.full((1,), reference.NEG), torch.zeros(1)
    p = torch.empty_like(s)
    cpu_tile.softmax_step(fn, s, p, m, l, None, None, 0, reference.NEG, reference.MASKED)
    return p, torch.exp2(s - s.max())


def build_elsewhere():
    """Build the library in another process: a library this process has loaded stays mapped, and
    damaging a mapped file in place would crash this process, not test the cache."""
    code = "from headscope_kernels import cpu_tile; cpu_tile._build(cpu_tile._compiler())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


@pytest.fixture
def cache(monkeypatch, tmp_path):
    folder = tmp_path / "cache"
    monkeypatch.setenv("HEADSCOPE_CACHE", str(folder))
    return folder


def test_cache_folder_follows_headscope_cache_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.delenv("HEADSCOPE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cpu_tile.cache_folder() == tmp_path / "xdg" / "headscope"
    monkeypatch.setenv("HEADSCOPE_CACHE", str(tmp_path / "own"))
    assert cpu_tile.cache_folder() == tmp_path / "own"
    monkeypatch.delenv("HEADSCOPE_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cpu_tile.cache_folder() == tmp_path / "home" / ".cache" / "headscope"


@needs_compiler
def test_built_under_umask_000_the_folder_and_library_stay_private(cache):
    old = os.umask(0)
    try:
        fn = cpu_tile._build(cpu_tile._compiler())
    finally:
        os.umask(old)
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    (lib,) = cache.glob("*.so")
    assert stat.S_IMODE(lib.stat().st_mode) & 0o077 == 0
    p, want = run_step(fn)
    assert torch.allclose(p, want, rtol=3e-7)


@needs_compiler
@pytest.mark.parametrize("damage", ["truncated", "replaced", "no-record"])
def test_a_damaged_or_foreign_library_is_rebuilt_not_loaded(cache, damage):
    build_elsewhere()
    (lib,) = cache.glob("*.so")
    good = lib.read_bytes()
    if damage == "truncated":  # once crashed every later run with a bus error
        lib.write_bytes(good[: len(good) // 2])
    elif damage == "replaced":  # someone else's library with the expected name
        lib.write_bytes(good[:-1] + bytes([good[-1] ^ 0xFF]))
    else:
        (cache / (lib.name + ".sha256")).unlink()
    fn = cpu_tile._build(cpu_tile._compiler())
    assert lib.read_bytes() == good  # rebuilt (the compiler is deterministic here)
    p, want = run_step(fn)
    assert torch.allclose(p, want, rtol=3e-7)


@needs_compiler
def test_a_library_owned_by_another_user_is_refused(cache):
    if os.getuid() != 0:
        pytest.skip("changing a file's owner needs root")
    build_elsewhere()
    (lib,) = cache.glob("*.so")
    os.chown(lib, 12345, 12345)
    with pytest.raises(RuntimeError, match="belongs to another user"):
        cpu_tile._build(cpu_tile._compiler())


@needs_compiler
def test_a_group_writable_cache_folder_is_refused_and_the_eager_step_runs(cache, monkeypatch):
    cache.mkdir(mode=0o700)
    cache.chmod(0o775)
    with pytest.raises(RuntimeError, match="writable by group or others"):
        cpu_tile._build(cpu_tile._compiler())
    monkeypatch.setattr(cpu_tile, "_loaded", False)
    monkeypatch.setattr(cpu_tile, "_fn", None)
    with pytest.warns(RuntimeWarning, match="writable by group or others"):
        assert cpu_tile.kernel() is None
    assert not list(cache.glob("*.so"))


@pytest.mark.parametrize("value", ["0", "off", "OFF", "false", "False", "no", " no "])
def test_every_documented_off_spelling_turns_the_kernel_off(monkeypatch, value):
    monkeypatch.setenv("HEADSCOPE_CPU_KERNEL", value)
    assert cpu_tile.enabled() is False and cpu_tile.kernel() is None


@pytest.mark.parametrize("value", ["1", "on", "true", "YES", ""])
def test_on_spellings_keep_it_on(monkeypatch, value):
    monkeypatch.setenv("HEADSCOPE_CPU_KERNEL", value)
    assert cpu_tile.enabled() is True


def test_an_unknown_spelling_is_an_error_naming_the_accepted_ones(monkeypatch):
    monkeypatch.setenv("HEADSCOPE_CPU_KERNEL", "disable")
    with pytest.raises(ValueError, match="'disable' is not understood.*0, off, false, no"):
        cpu_tile.enabled()


@needs_compiler
@pytest.mark.parametrize("fault", ["dtype", "contiguity", "state-shape", "best-dtype", "device-type"])
def test_the_ctypes_boundary_checks_every_tensor(fault):
    fn = cpu_tile.kernel()
    assert fn is not None
    s = torch.zeros(2, 3, 16)
    p, m, l, ent = torch.empty_like(s), torch.full((2, 3), reference.NEG), torch.zeros(2, 3), torch.zeros(2, 3)
    best = torch.full((2, 3), -1, dtype=torch.int64)
    if fault == "dtype":
        s = s.double()
    elif fault == "contiguity":
        p = torch.empty(2, 16, 3).transpose(1, 2)
    elif fault == "state-shape":
        m = torch.full((3, 2), reference.NEG)
    elif fault == "best-dtype":
        best = best.int()
    else:
        s = s.numpy()
    with pytest.raises((TypeError, ValueError), match="softmax_step: "):
        cpu_tile.softmax_step(fn, s, p, m, l, ent, best, 0, reference.NEG, reference.MASKED)
