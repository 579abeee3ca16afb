"""Colored Objects (BIG-bench; the second task of Merullo et al. 2023, "Circuit Component Reuse
Across Tasks"): "Q: On the table, I see an orange textbook, a red puzzle, and a purple cup. What
color is the textbook?\\nA:" -> " orange".

Clean asks for one object's colour; corrupt asks for another object of the same list, so the
answer moves: the metric is logit(clean colour) - logit(corrupt colour). In-context examples
(``shots``) come first. Word lists ship in ``datasets/colored_objects.json``.
"""

from __future__ import annotations

import json
import random

from headscope.data import dataset_path
from headscope.tasks.circuit_pairs import CircuitPair


def load_colored_objects(path=None) -> dict:
    return json.loads((dataset_path("colored_objects.json") if path is None else path).read_text())


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _question(data, rng):
    colors = rng.sample(data["colors"], data["n_objects"])
    objects = rng.sample(data["objects"], data["n_objects"])
    items = [f"{_article(c)} {c} {o}" for c, o in zip(colors, objects)]
    listed = ", ".join(items[:-1]) + ", and " + items[-1]
    surface = rng.choice(data["surfaces"])
    return colors, objects, lambda q: data["template"].format(surface=surface, items=listed, query=q)


def colored_objects_pairs(n: int = 64, seed: int = 0, data: dict | None = None) -> list[CircuitPair]:
    """``n`` seeded pairs; clean and corrupt share the shots and the object list."""
    data = data or load_colored_objects()
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        shots = ""
        for _ in range(data.get("shots", 1)):
            colors, objects, prompt = _question(data, rng)
            k = rng.randrange(len(objects))
            shots += prompt(objects[k]) + " " + colors[k] + "\n\n"
        colors, objects, prompt = _question(data, rng)
        i, j = rng.sample(range(len(objects)), 2)
        pairs.append(CircuitPair(shots + prompt(objects[i]), shots + prompt(objects[j]), " " + colors[i], " " + colors[j]))
    return pairs
