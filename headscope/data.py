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


def read_jsonl(path, what: str, hint: str):
    """Yield ``(line number, parsed value)`` for each non-empty line of a JSONL file.

    ``what`` names the file in errors ("needles file"); ``hint`` says what a line should look like.
    """
    path = Path(path)
    for lineno, line in enumerate(read_text(path, what).splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as exc:
            raise HeadscopeError(f"{path}:{lineno} is not valid JSON ({exc.msg}); {hint}") from None
