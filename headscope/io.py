"""Files written whole: the one atomic writer (a temp file in the target folder, then a rename), so
a reader never sees half a file and a failed write leaves the old file and no temp file behind."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from headscope.errors import HeadscopeError


def temp_name(name: str) -> str:
    """The longest name of the temp file :func:`write_whole` writes ``name`` through."""
    return f".{name}.{'x' * 8}.tmp"  # mkstemp's random part is 8 characters


def write_whole(path, content) -> Path:
    """Write ``content`` to ``path`` whole (temp file + rename), mode from the umask; no temp file
    is left behind if the write fails. ``content``: the text, the bytes (binary formats, e.g.
    safetensors' ``save``: their write errors are then the file system's OSError), or a function
    that writes the file at the path it is given."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise _cannot_write(path, exc) from None
    try:
        binary = isinstance(content, (bytes, bytearray, memoryview))
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as handle:
            if not callable(content):
                handle.write(content)
        if callable(content):
            content(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise _cannot_write(path, exc) from None
        raise
    return path


def _cannot_write(path: Path, exc: OSError) -> HeadscopeError:
    """The file system's refusal (full disk, file size limit, permissions) as one line naming the file."""
    return HeadscopeError(f"cannot write {path}: {exc.strerror or exc}; its old version is unchanged. Check the free "
                          "space, the file size limit (ulimit -f) and the folder's permissions")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
