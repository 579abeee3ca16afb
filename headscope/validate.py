"""Checks on what users hand headscope: input files, output paths, numbers, devices, model folders.

Every check raises :class:`HeadscopeError` naming what was wrong and the fix, so the CLI turns it
into one ``error:`` line. Readers (scores, data, tasks) call these; the CLI calls the output-path
checks before any model is loaded.
"""

from __future__ import annotations

import argparse
import json
import math
import numbers
import os
import stat
import tempfile
from pathlib import Path

import torch

from headscope.errors import HeadscopeError

MAX_INPUT_BYTES = 256 * 2**20  # text inputs are prompts, rankings, needles: far smaller


# ------------------------------------------------------------------------------ input files
def read_text(path, what: str, *, limit: int = MAX_INPUT_BYTES) -> str:
    """The text of a regular UTF-8 file of at most ``limit`` bytes (``what`` names it in errors)."""
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise HeadscopeError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise HeadscopeError(f"cannot read {what} {path}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "a device, pipe or socket"
        raise HeadscopeError(f"{what} {path} is not a regular file (it is {kind}); give a text file")
    if info.st_size > limit:
        raise HeadscopeError(f"{what} {path} is too large ({info.st_size:,} bytes; the limit is {limit:,}); "
                             "give a smaller file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise HeadscopeError(f"cannot read {what} {path}: {exc.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HeadscopeError(f"{what} {path} is not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                             "save it as UTF-8") from None


def read_json(path, what: str, hint: str):
    """The parsed JSON of a file read with :func:`read_text`."""
    text = read_text(path, what)

    def unique(pairs):  # {"kind": "zero", "kind": "scale"} would keep the last silently
        keys = [key for key, _ in pairs]
        for key in keys:
            if keys.count(key) > 1:
                raise HeadscopeError(f"{what} {path} gives the key {key!r} twice in one object; keep one. {hint}")
        return dict(pairs)

    try:
        return json.loads(text, object_pairs_hook=unique)
    except json.JSONDecodeError as exc:
        raise HeadscopeError(f"{what} {path} is not valid JSON ({exc.msg}, line {exc.lineno}); {hint}") from None
    except RecursionError:  # "[[[[..." nested deeper than the parser's recursion limit
        raise HeadscopeError(f"{what} {path} nests JSON too deeply to read; {hint}") from None


# ------------------------------------------------------------------------------ output files
def check_output(path, what: str) -> Path:
    """Fail now, not after the run, if ``path`` cannot be written: a directory, a file used as a
    folder, or a place without write permission."""
    path = Path(path)
    if path.is_dir():
        raise HeadscopeError(f"{what} {path} is a directory; give a file path, e.g. {path / 'out'}")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:  # missing folders are created on write
        folder = folder.parent
    if not folder.is_dir():
        raise HeadscopeError(f"cannot write {what} {path}: {folder} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".headscope-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise HeadscopeError(f"cannot write {what} {path}: {folder} is not writable ({exc.strerror}); "
                             "choose another path") from None
    return path


# ------------------------------------------------------------------------------ numbers
def check_finite(value, what: str) -> float:
    """``value`` as a finite float (not NaN, not inf, not text)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise HeadscopeError(f"{what} must be a number; got {value!r}")
    if not math.isfinite(value):
        raise HeadscopeError(f"{what} must be a finite number; got {value!r}")
    return float(value)


def finite_float(text: str) -> float:
    """argparse type: a finite number (nan and inf make results meaningless)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def int_at_least(minimum: int):
    """argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


positive_int, nonnegative_int = int_at_least(1), int_at_least(0)


def number_list(cast, *, positive: bool = False):
    """argparse type: a non-empty comma-separated list of finite numbers (``cast``: int or float)."""
    kind = "integers" if cast is int else "numbers"

    def parse(text: str) -> list:
        try:
            values = [cast(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind}, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind}, got an empty list {text!r}")
        bad = [v for v in values if not math.isfinite(v) or (positive and v <= 0)]
        if bad:
            raise argparse.ArgumentTypeError(
                f"every value must be a finite number{' > 0' if positive else ''}; got {bad}")
        return values

    return parse


# ------------------------------------------------------------------------------ models
DTYPES = ("float32", "float16", "bfloat16", "auto")


def check_dtype(dtype):
    """The torch dtype (or "auto") for a --dtype string; only floating dtypes run a model."""
    if dtype == "auto" or (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return getattr(torch, dtype)
    raise HeadscopeError(f"--dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")


def check_device(device, option: str = "--device"):
    """A device torch can use here: CUDA / MPS / XPU only where available, an index that exists
    (``option``: how the error names where it came from)."""
    if device is None:
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise HeadscopeError(f"{option} {device!r} is not a torch device; use cpu, cuda, cuda:1 or mps") from None
    if parsed.type == "cpu":
        return device
    backend = getattr(torch, parsed.type, None)
    if backend is None or not getattr(backend, "is_available", lambda: False)():
        name = "CUDA" if parsed.type == "cuda" else parsed.type
        raise HeadscopeError(f"{option} {device}: {name} is not available on this machine; use "
                             + ("--device cpu" if option == "--device" else "cpu"))
    count = getattr(backend, "device_count", lambda: 1)()
    if parsed.index is not None and parsed.index >= count:
        raise HeadscopeError(f"{option} {device}: this machine has {count} {parsed.type} device(s) (0..{count - 1})")
    return device


def check_model_folder(path: Path) -> None:
    """A local model folder has a config.json holding a JSON object with a model_type."""
    if path.is_file():
        raise HeadscopeError(f"{path} is a file, not a model folder; pass the folder holding config.json")
    config = path / "config.json"
    if not config.exists():
        raise HeadscopeError(f"{path} is a folder without config.json: not a transformers model folder")
    data = read_json(config, "model config", "fix or re-download the model folder")
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise HeadscopeError(f"{config} is not a transformers config: it needs a JSON object with a "
                             "'model_type' (e.g. \"llama\"); fix or re-download the model folder")
