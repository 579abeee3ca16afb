"""Paths to the small data files shipped in the top-level ``datasets/`` folder.

The folder is installed as the namespace package ``headscope_datasets`` (no ``__init__.py``, so it
never shadows the Hugging Face ``datasets`` package when Python runs from the repository root).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from headscope.errors import HeadscopeError
from headscope.validate import read_text


def dataset_path(name: str) -> Path:
    """Absolute path of a file shipped in ``datasets/`` (e.g. ``"needles.jsonl"``)."""
    spec = importlib.util.find_spec("headscope_datasets")
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / name
        if path.exists():
            return path
    raise FileNotFoundError(f"shipped dataset {name!r} not found (is headscope installed with its datasets/?)")


def json_kind(text: str) -> str | None:
    """What a file holds, told by its content (never its name): ``"array"`` (one JSON array),
    ``"lines"`` (JSONL: its first non-empty line opens a JSON object), else None (plain text)."""
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            if isinstance(json.loads(stripped), list):
                return "array"
        except (json.JSONDecodeError, RecursionError):  # not JSON, or nested too deeply to tell
            pass
    return "lines" if stripped.startswith("{") else None


def read_plain(path, what: str, reads: str) -> str:
    """The text of a plain-text input (``reads``: how it is read, e.g. "one text per line"); JSON
    or JSONL content is refused, since read as plain text its lines would silently become texts."""
    text = read_text(path, what)
    kind = json_kind(text)
    if kind is not None:
        held = "a JSON array" if kind == "array" else "JSON Lines"
        raise HeadscopeError(f"{what} {path} holds {held}, but it is read as plain text ({reads}); give a plain "
                             "text file")
    return text


def read_jsonl(path, what: str, hint: str):
    """Yield ``(line number, parsed value)`` for each non-empty line of a JSONL file, or ``(item
    number, value)`` for each item of a file holding one JSON array (told by content, whatever its name).

    ``what`` names the file in errors ("needles file"); ``hint`` says what a line should look like.
    """
    path = Path(path)
    text = read_text(path, what)
    if json_kind(text) == "array":
        yield from enumerate(json.loads(text), 1)
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as exc:
            raise HeadscopeError(f"{path}:{lineno} is not valid JSON ({exc.msg}); {hint}") from None
        except RecursionError:
            raise HeadscopeError(f"{path}:{lineno} nests JSON too deeply to read; {hint}") from None
