"""Paths to the small data files shipped in ``datasets/``."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def dataset_path(name: str) -> Path:
    """Absolute path of a file shipped in ``datasets/`` (e.g. ``"needles.jsonl"``)."""
    path = Path(str(resources.files("headscope_datasets").joinpath(name)))
    if not path.exists():
        raise FileNotFoundError(f"shipped dataset {name!r} not found at {path}")
    return path
