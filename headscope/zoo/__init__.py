"""Model organisms: tiny models trained by the project's own scripts, shipped with their weights,
tokenizer and a measured ground truth, so analyzers can be checked against a known answer."""

from __future__ import annotations

import json
from pathlib import Path

ZOO_DIR = Path(__file__).resolve().parent

ORGANISMS: dict[str, str] = {
    "retrieval": "Tiny Llama (GQA) trained on synthetic needle-in-a-haystack retrieval "
    "(python -m headscope.zoo.train_retrieval)",
    "refusal": "Tiny Llama (GQA) that refuses made-up forbidden topics and answers sums otherwise "
    "(python -m headscope.zoo.train_refusal)",
    "context_conflict": "Tiny Llama (GQA) that memorised 48 made-up capitals and reads contexts that may contradict "
    "them, NQ-Swap style (python -m headscope.zoo.train_context_conflict)",
    "multitask": "Tiny Llama (GQA) trained on induction, in-context key-value lookup and a fixed token map "
    "(python -m headscope.zoo.train_multitask)",
    "topics": "Tiny Llama over filler words where trigger words make later words colours, animals or numbers; "
    "one head writes each concept, for head pursuit (python -m headscope.zoo.train_topics)",
    "icl": "Tiny Llama (GQA) that learns four word-to-word tasks from demonstrations (next / prev, colour / animal); "
    "0-shot it cannot tell them apart, for soft injection of task embeddings (python -m headscope.zoo.train_icl)",
}

DEFAULT_MODEL = "retrieval"


def organism_path(name: str) -> Path | None:
    """Folder of a shipped organism, or None if ``name`` is not one."""
    name = name.removeprefix("organism:")
    if name not in ORGANISMS:
        return None
    return ZOO_DIR / name


def organism_info(name: str) -> dict:
    """The organism's ``organism.json`` (description, default task grid, training record)."""
    path = organism_path(name)
    if path is None or not (path / "organism.json").exists():
        return {}
    return json.loads((path / "organism.json").read_text())


def ground_truth_path(name: str) -> Path | None:
    path = organism_path(name)
    if path is None or not (path / "ground_truth.csv").exists():
        return None
    return path / "ground_truth.csv"
