"""Indirect object identification (Wang et al. 2022, "Interpretability in the Wild").

Clean: "When Mary and John went to the store, John gave a drink to" -> " Mary" (the indirect
object), wrong " John" (the subject). Corrupt: the ABC distribution of the paper, the repeated
subject replaced by a third name ("..., Tom gave a drink to"), which removes the duplicate-name
cue the circuit uses. Templates and names ship in ``datasets/ioi_templates.json``.
"""

from __future__ import annotations

import json
import random

from headscope.data import dataset_path
from headscope.tasks.circuit_pairs import CircuitPair


def load_ioi_templates(path=None) -> dict:
    return json.loads((dataset_path("ioi_templates.json") if path is None else path).read_text())


def ioi_pairs(n: int = 64, seed: int = 0, templates: dict | None = None) -> list[CircuitPair]:
    """``n`` seeded IOI pairs (clean ABB, corrupt ABC; answer " A", wrong " B")."""
    data = templates or load_ioi_templates()
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        template = rng.choice(data["templates"])
        a, b, c = rng.sample(data["names"], 3)
        fill = {"place": rng.choice(data["places"]), "object": rng.choice(data["objects"])}
        head, tail = template.split("{B}", 1)[0], template.split("{B}", 1)[1]
        clean = template.format(A=a, B=b, **fill)
        corrupt = (head + "{B}" + tail.replace("{B}", "{C}")).format(A=a, B=b, C=c, **fill)
        pairs.append(CircuitPair(clean, corrupt, " " + a, " " + b))
    return pairs
