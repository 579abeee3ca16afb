"""Context versus memory (NQ-Swap style, Longpre et al. 2021; used by DeCoRe, Gema et al. 2024).

A small synthetic world of made-up countries and their capitals. A model memorises the capitals
(closed-book questions) and is asked questions whose context states a *different* capital
(a swapped context): answering with the context's value is context-faithful.

Prompts are built at the token level, so the context statement's token span is known exactly
(it is the "needle" for the retrieval-head criterion)::

    <bos> Context : The capital of Y is W . The capital of X is V . \\n Question : What is the
    capital of X ? \\n Answer :

The same code builds the organism's training prompts and the evaluation prompts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Sequence

from headscope.errors import HeadscopeError
from headscope.tasks.needle import NeedleTrial, encode_with_span

STATEMENT = "The capital of {entity} is {value} ."
QUESTION = "\nQuestion : What is the capital of {entity} ?\nAnswer :"
CLOSED_BOOK = "Question : What is the capital of {entity} ?\nAnswer :"
_SYLLABLES = "ka lo mi ra ven dor tis bel zar nu qui fen gal hor pli sam tor vex mar lin".split()


@dataclass(frozen=True)
class World:
    """Entities, their memorised values, and per-entity memory strength.

    ``strength[e]`` is the share of *training* conflict prompts about ``e`` that were answered from
    memory instead of the context (it makes the organism's parametric memory fight the context for
    some entities, as popular facts do in real models).
    """

    entities: tuple[str, ...]
    values: tuple[str, ...]
    memory: dict[str, str]
    strength: dict[str, float]


def make_world(n_entities: int = 48, n_values: int = 24, strengths=(0.1, 0.35, 0.65, 0.9), seed: int = 0) -> World:
    """A deterministic world: made-up names (two or three syllables, one word each)."""
    rng = random.Random(seed)
    names: list[str] = []
    while len(names) < n_entities + n_values:
        word = "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 3)))).capitalize()
        if word not in names:
            names.append(word)
    entities, values = tuple(names[:n_entities]), tuple(names[n_entities:])
    memory = {e: rng.choice(values) for e in entities}
    strength = {e: strengths[i % len(strengths)] for i, e in enumerate(entities)}
    return World(entities, values, memory, strength)


@dataclass
class ConflictTrial(NeedleTrial):
    """A context prompt. ``needle_span`` is the target statement, ``answer_span`` the value inside it,
    ``answer_ids`` the context value.

    ``memory_ids`` is the memorised value (equal to the answer when the context is consistent).
    """

    memory_ids: list[int] = field(default_factory=list)
    memory: str = ""
    entity: str = ""


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class ContextConflictTask:
    """Builds closed-book, consistent-context and swapped-context prompts for one tokenizer."""

    def __init__(self, tokenizer, world: World | None = None, distractors: tuple[int, int] = (1, 3)):
        self.tokenizer = tokenizer
        self.world = world or make_world()
        self.distractors = distractors
        bos = tokenizer.bos_token_id
        self._bos = [bos] if bos is not None else []
        unknown = [w for w in self.world.entities + self.world.values if len(_encode(tokenizer, w)) != 1]
        if unknown:
            raise HeadscopeError(
                f"the tokenizer splits entity/value names {unknown[:5]} into several tokens; the context-conflict "
                "task needs one token per name (use the context_conflict organism's tokenizer)"
            )

    def token(self, word: str) -> int:
        return _encode(self.tokenizer, word)[0]

    def closed_book(self, entity: str) -> tuple[list[int], list[int]]:
        """Prompt ids and memorised-answer ids of a question without context."""
        prompt = self._bos + _encode(self.tokenizer, CLOSED_BOOK.format(entity=entity))
        return prompt, [self.token(self.world.memory[entity])]

    def build(self, entity: str, value: str, rng: random.Random, n_distractors: int | None = None) -> ConflictTrial:
        """A context prompt stating ``entity``'s capital is ``value``, among distractor statements."""
        w = self.world
        if n_distractors is None:
            n_distractors = rng.randint(*self.distractors)
        others = rng.sample([e for e in w.entities if e != entity], n_distractors)
        # distractors state the true capital half the time, a random one otherwise
        statements = [(o, w.memory[o] if rng.random() < 0.5 else rng.choice(w.values)) for o in others]
        at = rng.randint(0, len(statements))
        statements.insert(at, (entity, value))
        ids = self._bos + _encode(self.tokenizer, "Context :")
        span = answer = (0, 0)
        for i, (e, v) in enumerate(statements):
            piece, (a, b) = encode_with_span(self.tokenizer, STATEMENT.format(entity=e, value=v), f" {v} ")
            if i == at:
                span, answer = (len(ids), len(ids) + len(piece)), (len(ids) + a, len(ids) + b)
            ids += piece
        ids += _encode(self.tokenizer, QUESTION.format(entity=entity))
        memory = w.memory[entity]
        return ConflictTrial(
            prompt_ids=ids,
            needle_span=span,
            answer_span=answer,
            answer_ids=[self.token(value)],
            answer=value,
            length=len(ids),
            depth=100.0 * at / max(1, len(statements) - 1),
            needle_index=w.entities.index(entity),
            memory_ids=[self.token(memory)],
            memory=memory,
            entity=entity,
            meta={"swapped": value != memory, "strength": w.strength[entity]},
        )

    def swapped(self, entity: str, rng: random.Random) -> ConflictTrial:
        """A context prompt whose statement contradicts the memorised capital (NQ-Swap)."""
        value = rng.choice([v for v in self.world.values if v != self.world.memory[entity]])
        return self.build(entity, value, rng)

    def eval_trials(self, n: int = 192, seed: int = 1234) -> list[ConflictTrial]:
        """``n`` swapped-context prompts, cycling over the entities (fixed seed: the same set every run)."""
        if n < 1:
            raise HeadscopeError(f"the number of context-conflict prompts must be >= 1; got {n}")
        rng = random.Random(seed)
        return [self.swapped(self.world.entities[i % len(self.world.entities)], rng) for i in range(n)]


def is_faithful(generated_ids: Sequence[int], trial: ConflictTrial) -> bool:
    """Context-faithful: the first generated token is the context's value."""
    return bool(generated_ids) and int(generated_ids[0]) == trial.answer_ids[0]
