"""Synthetic scenes for the vision organism: coloured shapes on a 4 x 4 grid, with a co-occurrence prior.

A scene is a few objects (a shape ``kind`` in a ``colour``), each in its own 8 x 8 cell of a 32 x 32
image. Three *anchor* kinds nearly always come with their *partner* (``PAIRS``: circle -> square,
triangle -> cross, ring -> bar), like forks with knives in COCO: the prior that makes a captioner
name the partner when it is absent (object hallucination, Rohrbach et al. 2018; POPE's adversarial
negatives, Li et al. 2023). Captions list the objects in ``KINDS`` order, so a partner is always
named right after its anchor: "a red circle and a blue square and a green diamond ."

Everything is deterministic given a seed (``random.Random``), so held-out sets need no files.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from headscope import vision
from headscope.errors import HeadscopeError
from headscope.tasks.hallucination import hallucination_metrics

KINDS = ("circle", "square", "triangle", "cross", "ring", "bar", "diamond", "frame")
PAIRS = {"circle": "square", "triangle": "cross", "ring": "bar"}  # anchor -> partner
SOLOS = ("diamond", "frame")
COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}
GRID, CELL = 4, 8
IMAGE_SIZE = GRID * CELL

CAPTION_PROMPT = "<image>\ndescribe :"
QUESTION_PROMPT = "<image>\nis there a {object} ?"


@dataclass(frozen=True)
class Obj:
    kind: str
    colour: str
    cell: int  # 0 .. GRID*GRID-1, row-major


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    noise_seed: int

    @property
    def kinds(self) -> frozenset[str]:
        return frozenset(o.kind for o in self.objects)

    def caption(self) -> str:
        """The objects in ``KINDS`` order: "a red circle and a blue square ."."""
        ordered = sorted(self.objects, key=lambda o: KINDS.index(o.kind))
        return " and ".join(f"a {o.colour} {o.kind}" for o in ordered) + " ."

    def image(self, noise: float = 12.0):
        """The scene as a 32 x 32 RGB ``PIL.Image`` (dark background, pixel noise of std ``noise``)."""
        rng = np.random.default_rng(self.noise_seed)
        pixels = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 30.0)
        for obj in self.objects:
            r, c = divmod(obj.cell, GRID)
            cell = pixels[r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL]
            cell[SHAPES[obj.kind]] = COLOURS[obj.colour]
        pixels += rng.normal(0.0, noise, pixels.shape)
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _masks() -> dict[str, np.ndarray]:
    """8 x 8 boolean masks of the shapes (centre at 3.5, 3.5)."""
    y, x = np.mgrid[0:CELL, 0:CELL] - 3.5
    r = np.sqrt(x**2 + y**2)
    return {
        "circle": r <= 3.2,
        "square": (np.abs(x) <= 3) & (np.abs(y) <= 3),
        "triangle": (y >= -3) & (y <= 3) & (np.abs(x) <= (y + 3.5) / 2),
        "cross": ((np.abs(x) <= 1) | (np.abs(y) <= 1)) & (np.abs(x) <= 3) & (np.abs(y) <= 3),
        "ring": (r <= 3.6) & (r >= 2.2),
        "bar": (np.abs(y) <= 1) & (np.abs(x) <= 3),
        "diamond": np.abs(x) + np.abs(y) <= 3.5,
        "frame": (np.maximum(np.abs(x), np.abs(y)) <= 3.5) & (np.maximum(np.abs(x), np.abs(y)) >= 2.5),
    }


SHAPES = _masks()


def sample_scene(rng: random.Random, absent: float = 0.03, partner_absent: bool = False) -> Scene:
    """A random scene: one or two groups (a pair or a solo kind), 1-4 objects in distinct cells.

    A pair's partner is missing with probability ``absent`` (and its anchor, equally often), so
    the two nearly always appear together. ``partner_absent=True`` forces one anchor without its
    partner (the held-out probe where the prior misleads).
    """
    groups = list(PAIRS) + list(SOLOS)
    chosen = rng.sample(groups, rng.choice((1, 2)))
    kinds: list[str] = []
    for i, group in enumerate(chosen):
        if group not in PAIRS:
            kinds.append(group)
        elif partner_absent and i == 0:
            kinds.append(group)
        else:
            u = rng.random()
            kinds += [group] if u < absent / 2 else [PAIRS[group]] if u < absent else [group, PAIRS[group]]
    if partner_absent and chosen[0] not in PAIRS:
        return sample_scene(rng, absent, partner_absent)
    cells = rng.sample(range(GRID * GRID), len(kinds))
    objects = tuple(Obj(k, rng.choice(list(COLOURS)), cell) for k, cell in zip(kinds, cells))
    return Scene(objects, rng.randrange(1 << 30))


def heldout_scenes(n: int, seed: int = 1234, partner_absent: bool = True) -> list[Scene]:
    """``n`` deterministic held-out scenes (default: each has an anchor without its partner)."""
    rng = random.Random(seed)
    return [sample_scene(rng, partner_absent=partner_absent) for _ in range(n)]


@functools.lru_cache(maxsize=4)
def training_statistics(n: int = 5000, seed: int = 0, absent: float = 0.03):
    """Over ``n`` training scenes: the share containing each kind (POPE's popular negatives) and
    the share containing both kinds of each ordered pair (POPE's adversarial negatives)."""
    rng = random.Random(seed)
    frequency = dict.fromkeys(KINDS, 0.0)
    together: dict[tuple[str, str], float] = {}
    for _ in range(n):
        kinds = sample_scene(rng, absent).kinds
        for a in kinds:
            frequency[a] += 1 / n
            for b in kinds - {a}:
                together[a, b] = together.get((a, b), 0.0) + 1 / n
    return frequency, together


def scene_metrics(hm, scenes, *, caption_prompt: str = CAPTION_PROMPT,
                  question_template: str = QUESTION_PROMPT, settings=("random", "popular", "adversarial"),
                  batch_size: int = 32, max_new_tokens: int = 24) -> dict[str, float]:
    """CHAIR and POPE (``hallucination.hallucination_metrics``) on ``scenes``, with POPE's popular and
    adversarial negatives from the training distribution's kind frequencies and co-occurrences."""
    frequency, together = training_statistics()
    return hallucination_metrics(
        hm, [s.image() for s in scenes], [s.kinds for s in scenes], KINDS, caption_prompt=caption_prompt,
        question_template=question_template, frequency=frequency, cooccurrence=together,
        settings=settings, batch_size=batch_size, max_new_tokens=max_new_tokens)


@torch.no_grad()
def first_object_accuracy(hm, scenes, attribute: str, *, caption_prompt: str = CAPTION_PROMPT,
                          batch_size: int = 32) -> dict[str, float]:
    """How often the model names the first caption object's ``attribute`` ("colour" or "kind") right,
    teacher-forced: the caption prefix up to that word is given ("a" for the colour, "a red" for the
    kind) and the next token is read among that attribute's words only.

    Returns ``accuracy`` (argmax over the attribute's words is the true one) and ``probability`` (mean
    softmax probability of the true word). The measure for editing visual-concept heads (Basile et
    al. 2025 edit heads for colours and shapes in captioning).
    """
    if attribute not in ("colour", "kind"):
        raise HeadscopeError(f"attribute must be 'colour' or 'kind'; got {attribute!r}")
    words = list(COLOURS) if attribute == "colour" else list(KINDS)
    tok = hm.processor.tokenizer
    ids = [tok.encode(w, add_special_tokens=False) for w in words]
    if any(len(i) != 1 for i in ids):
        raise HeadscopeError(f"every {attribute} word must be one token for this measure; got {dict(zip(words, ids))}")
    ids = torch.tensor([i[0] for i in ids], device=hm.device)
    hits, prob = 0, 0.0
    for start in range(0, len(scenes), batch_size):
        chunk = scenes[start:start + batch_size]
        firsts = [min(s.objects, key=lambda o: KINDS.index(o.kind)) for s in chunk]
        prefixes = [" a" if attribute == "colour" else f" a {o.colour}" for o in firsts]
        batch = vision.encode(hm, [s.image() for s in chunk], [caption_prompt + p for p in prefixes])
        logits = hm.model(**vision.with_positions(hm, batch)).logits[:, -1].float()
        p = logits[:, ids].softmax(-1)  # among the attribute's words
        truth = torch.tensor([words.index(o.colour if attribute == "colour" else o.kind) for o in firsts],
                             device=hm.device)
        hits += int((p.argmax(-1) == truth).sum())
        prob += float(p.gather(1, truth.view(-1, 1)).sum())
    return {"accuracy": hits / len(scenes), "probability": prob / len(scenes)}
