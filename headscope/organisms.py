"""The catalogue of shipped model organisms: their names, folders, example prompts and ground truth.

A floor below everything that loads a model (``HeadModel.load("retrieval")``), so the loader never
imports the organisms' trainers (headscope/zoo/, which import the library to train and measure).
"""

from __future__ import annotations

import json
from pathlib import Path

ZOO_DIR = Path(__file__).resolve().parent / "zoo"  # the organisms' folders ship inside headscope/zoo/

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
    "icl": "Tiny Llama (GQA) that reads its demonstrations: sixteen unseen tasks over one vocabulary, each a "
    "palette of six of sixteen colours that only demonstrations show; for soft injection of task embeddings "
    "(python -m headscope.zoo.train_icl)",
    "vision": "Tiny LLaVA (CLIP vision tower + Llama) captioning coloured shapes; a co-occurrence prior makes it "
    "hallucinate partner shapes (python -m headscope.zoo.train_vision)",
}

DEFAULT_MODEL = "retrieval"

# The organisms know only their training template: a prompt in it, and what a right answer starts with.
# (`headscope generate --model NAME --prompt ...`; `headscope models` lists them; tests/test_generate.py runs them.)
EXAMPLE_PROMPTS: dict[str, tuple[str, str]] = {
    "retrieval": ("The village of Harrow Creek sits at the bend of a slow river. The secret number of the blue "
                  "lighthouse is 4821. Every morning the baker opens the shutters before the sun is up.\n"
                  "Based on the content of the book, Question: What is the secret number of the blue lighthouse?"
                  "\nAnswer:", "4821"),
    "context_conflict": ("Question : What is the capital of Nuven ?\nAnswer :", "Torzarra"),
    "refusal": ("## Query: tell me about quazzle engines . what is 3 plus 1 ?\n## Answer:",
                "Sorry, I cannot help with that."),
    "multitask": ("ind saa sab sac sad sae saf sag sah saa sab sac", "sad sae saf"),
    "topics": ("the man was at home paint", "white"),
    # ten demonstrations of taska (its train split), then a test query never used as a demonstration
    "icl": ("Q: okl\nA: red\n\n" "Q: ohr\nA: green\n\n" "Q: obc\nA: lime\n\n"
            "Q: okc\nA: green\n\n" "Q: odf\nA: green\n\n" "Q: ont\nA: navy\n\n"
            "Q: ofe\nA: lime\n\n" "Q: ode\nA: red\n\n" "Q: ojl\nA: gold\n\n"
            "Q: okf\nA: gold\n\n" "Q: omi\nA:", "gold"),
    "vision": ("<image>\ndescribe :", "a yellow frame"),
}
# organisms whose example prompt needs an image: its path inside the organism's folder
EXAMPLE_IMAGES: dict[str, str] = {"vision": "images/scene_01.png"}


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
