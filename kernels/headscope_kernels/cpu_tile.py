"""The per-tile online-softmax step of the CPU torch backend, compiled: one fused pass per tile row.

See docs/METHODS.md, "Attention statistics without the pattern". For each row of a score tile
(log2 units) it finds the row max and its first index, writes p = 2^(s - max), sums p and
p * (s - max) (the entropy's term), and updates the running max, sum, entropy and top-1 index of
the online softmax, returning the factors that rescale the running accumulators. The eager torch
version of the same step (``reference.softmax_step_eager``) takes ~8 passes over the tile;
this takes two over each row, the second from L1 cache. The two matmuls stay in BLAS.

The C++ source, ``cpu_tile.cpp`` beside this module (GCC vector extensions, no torch headers,
shipped as package data), is compiled once per machine with the system C++ compiler (``$CXX``,
else ``c++`` / ``g++``) and called through ctypes, which releases the GIL, so the worker threads of
``reference.run_blocks`` run it in parallel. Without a compiler, or if the build fails,
:func:`kernel` warns once and returns None, and the eager step is used.

The build cache trusts only what it built: the folder is ``$HEADSCOPE_CACHE``, else
``$XDG_CACHE_HOME/headscope``, else ``~/.cache/headscope``, created private (0700 at most); a
library is loaded only when the current user owns it and its folder, neither is writable by group
or others, and its SHA-256 equals the one recorded when it was built (else it is rebuilt).

``HEADSCOPE_CPU_KERNEL`` turns the compiled step off with ``0``, ``off``, ``false`` or ``no``
(any case); ``1``, ``on``, ``true``, ``yes`` or unset leave it on; anything else is an error.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from importlib import resources
from pathlib import Path

import torch

SOURCE = (resources.files(__package__) / "cpu_tile.cpp").read_text()  # shipped as package data

FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC"]

_lock = threading.Lock()
_loaded = False
_fn = None


OFF_VALUES = ("0", "off", "false", "no")
ON_VALUES = ("", "1", "on", "true", "yes")


def enabled():
    """Whether ``HEADSCOPE_CPU_KERNEL`` allows the compiled step (one documented set of spellings)."""
    value = os.environ.get("HEADSCOPE_CPU_KERNEL", "").strip().lower()
    if value in OFF_VALUES:
        return False
    if value in ON_VALUES:
        return True
    raise ValueError(f"HEADSCOPE_CPU_KERNEL={os.environ['HEADSCOPE_CPU_KERNEL']!r} is not understood: "
                     f"use one of {', '.join(OFF_VALUES)} to turn the compiled CPU tile off, "
                     f"or {', '.join(v for v in ON_VALUES if v)} (or leave it unset) to keep it on")


def cache_folder():
    """Where compiled libraries live: $HEADSCOPE_CACHE, $XDG_CACHE_HOME/headscope or ~/.cache/headscope."""
    if os.environ.get("HEADSCOPE_CACHE"):
        return Path(os.environ["HEADSCOPE_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "headscope"


def _compiler():
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def _cpu_signature():
    """What the -march=native build depends on: the CPU's flags (a cache shared by machines of
    different CPUs must not hand one machine another's binary)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _check_private(path, what):
    """Refuse a file or folder that another user owns or that group or others may write."""
    st = path.stat()
    if st.st_uid != os.getuid():
        raise RuntimeError(f"{what} {path} belongs to another user (uid {st.st_uid}); headscope loads only "
                           "libraries it built itself: point HEADSCOPE_CACHE at a folder of your own")
    if st.st_mode & 0o022:
        raise RuntimeError(f"{what} {path} is writable by group or others (mode {st.st_mode & 0o777:o}); "
                           f"run `chmod go-w {path}` or point HEADSCOPE_CACHE at a private folder")


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _build(cxx):
    """Compile SOURCE into the cache once (the file name hashes source, flags, compiler and CPU) and
    load it, trusting only a private library whose recorded hash matches."""
    key = "\n".join([SOURCE, " ".join(FLAGS), cxx, platform.machine(), _cpu_signature()])
    name = f"softmax_tile-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
    folder = cache_folder()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)  # 0700 at most: the umask can only remove bits
    _check_private(folder, "the kernel cache folder")
    lib, recorded = folder / name, folder / (name + ".sha256")
    trusted = False
    if lib.exists() and recorded.exists():
        _check_private(lib, "the cached library")
        trusted = recorded.read_text().strip() == _sha256(lib)
    if not trusted:  # absent, truncated, replaced or never recorded: build it again
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            src, out = Path(tmp) / "softmax_tile.cpp", Path(tmp) / name
            src.write_text(SOURCE)
            done = subprocess.run([cxx, *FLAGS, str(src), "-o", str(out)], capture_output=True, text=True,
                                  timeout=300)
            if done.returncode != 0:
                raise RuntimeError(f"{cxx} failed: {done.stderr.strip()[-2000:]}")
            out.chmod(0o700 & ~_umask())
            digest = Path(tmp) / "digest"
            digest.write_text(_sha256(out) + "\n")
            digest.chmod(0o600 & ~_umask())  # private like the library, whatever the umask (000 gave 0666)
            os.replace(out, lib)  # whole files or none, also when processes build at once
            os.replace(digest, recorded)
        if recorded.read_text().strip() != _sha256(lib):  # another process replaced it in between
            raise RuntimeError(f"the cached library {lib} changed while it was being built; run again")
    fn = ctypes.CDLL(str(lib)).softmax_tile  # ctypes releases the GIL during the call
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float, ctypes.c_float]
    return fn


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def kernel():
    """The compiled ``softmax_tile`` (ctypes function), or None when it is turned off or cannot be
    built or trusted (then one warning; the caller uses the eager step)."""
    global _loaded, _fn
    if not enabled():
        return None
    with _lock:
        if not _loaded:
            _loaded = True
            try:
                cxx = _compiler()
                if not cxx:
                    raise RuntimeError("no C++ compiler found (set CXX or install g++)")
                _fn = _build(cxx)
            except Exception as err:  # any failure means: use the eager step
                _fn = None
                warnings.warn(f"headscope: the compiled CPU attention tile is unavailable ({err}); "
                              "using the slower eager torch step", RuntimeWarning, stacklevel=2)
        return _fn


def _check_tensor(name, t, dtype, shape):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"softmax_step: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"softmax_step: {name} is on {t.device}; the compiled tile runs on CPU tensors only")
    if t.dtype != dtype:
        raise TypeError(f"softmax_step: {name} has dtype {t.dtype}; it must be {dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"softmax_step: {name} has shape {tuple(t.shape)}; it must be {tuple(shape)}")
    if not t.is_contiguous():
        raise ValueError(f"softmax_step: {name} is not contiguous; call .contiguous() first")


def softmax_step(fn, s, p, run_max, run_sum, run_ent, best, ks, neg, masked):
    """Run the compiled step on the fp32 tile ``s`` [..., rows, m] (contiguous), writing p into ``p``
    (may be ``s``) and updating the running [..., rows] state in place. Returns (alpha, weight), the
    factors for the running accumulators and for this tile's contributions.

    Every tensor is checked (device, dtype, shape, contiguity) before its pointer crosses into C++:
    the library trusts them, so a wrong one would read or write out of bounds."""
    if not isinstance(s, torch.Tensor) or s.dim() < 1:
        raise ValueError("softmax_step: s must be a tensor [..., rows, m]")
    rows = tuple(s.shape[:-1])
    _check_tensor("s", s, torch.float32, s.shape)
    _check_tensor("p", p, torch.float32, s.shape)
    _check_tensor("run_max", run_max, torch.float32, rows)
    _check_tensor("run_sum", run_sum, torch.float32, rows)
    if run_ent is not None:
        _check_tensor("run_ent", run_ent, torch.float32, rows)
    if best is not None:
        _check_tensor("best", best, torch.int64, rows)
    alpha, weight = torch.empty_like(run_max), torch.empty_like(run_max)
    fn(s.data_ptr(), p.data_ptr(), run_max.numel(), s.shape[-1], int(ks), run_max.data_ptr(), run_sum.data_ptr(),
       _ptr(run_ent), _ptr(best), alpha.data_ptr(), weight.data_ptr(), float(neg), float(masked))
    return alpha, weight


def _ptr(t):
    return None if t is None else t.data_ptr()
