"""Needle in a haystack (Wu et al. 2024, "Retrieval Head Mechanistically Explains Long-Context
Factuality"): filler text repeated to a length, a needle sentence inserted at a depth, a question
at the end.

Prompts are assembled at the token level, so the needle's token span is known exactly:
``[bos] + prefix + haystack-with-needle + question``. ``length`` is the whole prompt in tokens,
so the question always fits (the reference keeps a ~200-token buffer for it instead).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from headscope.data import dataset_path, read_jsonl, read_plain
from headscope.errors import HeadscopeError

DEFAULT_TEMPLATE = "Based on the content of the book, Question: {question}\nAnswer:"
_CHAT_PLACEHOLDER = "\u2063HEADSCOPE_CONTEXT\u2063"


@dataclass(frozen=True)
class Needle:
    """A needle sentence, its question and answer.

    ``answer_span`` names the words of the needle that hold the answer (the reference's
    ``real_needle``): retrieval hits are looked for there and divided by its token length. It
    defaults to ``answer``, which must then occur in the needle literally.
    """

    needle: str
    question: str
    answer: str
    answer_span: str | None = None

    def __post_init__(self):
        if self.span_text not in self.needle:
            field_name = "answer_span" if self.answer_span is not None else "answer"
            raise HeadscopeError(
                f"the needle {self.needle!r} does not contain its {field_name} {self.span_text!r}; give an "
                '"answer_span" naming the words of the needle that hold the answer'
            )

    @property
    def span_text(self) -> str:
        return self.answer_span if self.answer_span is not None else self.answer


@dataclass
class NeedleTrial:
    """One prompt of the grid. ``needle_span`` (the needle sentence) and ``answer_span`` (the answer
    phrase inside it) are [start, stop) in ``prompt_ids``."""

    prompt_ids: list[int]
    needle_span: tuple[int, int]
    answer_ids: list[int]
    answer: str
    length: int
    depth: float
    needle_index: int
    meta: dict = field(default_factory=dict)
    answer_span: tuple[int, int] | None = None


def load_needles(path: str | Path | None = None) -> list[Needle]:
    """Read needles from JSONL: one ``{"needle", "question", "answer"}`` object per line, with an
    optional ``"answer_span"`` (the needle's words holding the answer, when not literally ``answer``)."""
    path = Path(path) if path is not None else dataset_path("needles.jsonl")
    needles = []
    hint = 'each line must be an object like {"needle": "...", "question": "...", "answer": "..."}'
    for lineno, row in read_jsonl(path, "needles file", hint):
        missing = [k for k in ("needle", "question", "answer") if not isinstance(row, dict) or not row.get(k)]
        if missing:
            raise HeadscopeError(
                f"{path}:{lineno} lacks non-empty field(s) {missing}; each line needs "
                '"needle", "question" and "answer"'
            )
        needles.append(_checked_needle(row, f"{path}:{lineno}"))
    if not needles:
        raise HeadscopeError(f"needles file {path} holds no needles; add JSONL lines with needle, question, answer")
    return needles


def _checked_needle(row: dict, where: str) -> Needle:
    """A needle whose fields are text and whose answer (or answer_span) occurs in it (else nothing can retrieve it)."""
    for key in ("needle", "question", "answer"):
        if not isinstance(row[key], str):
            raise HeadscopeError(f"{where}: {key} must be text (a JSON string); got {row[key]!r}")
        if not row[key].strip():
            raise HeadscopeError(f"{where}: {key} is blank; give the text")
    span = row.get("answer_span")
    if span is not None and (not isinstance(span, str) or not span.strip()):
        raise HeadscopeError(f"{where}: \"answer_span\" must be a non-empty string when given")
    try:
        return Needle(row["needle"], row["question"], row["answer"].strip(), span)
    except HeadscopeError as exc:
        raise HeadscopeError(f"{where}: {exc}") from None


def load_haystack(path: str | Path | None = None) -> list[str]:
    """Filler text split into sentences (the shipped default, or the user's own text file)."""
    path = Path(path) if path is not None else dataset_path("haystack.txt")
    text = " ".join(read_plain(path, "haystack file", "filler sentences").split())
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", text) if s]
    if not sentences:
        raise HeadscopeError(f"haystack file {path} is empty; give a text file with filler sentences")
    return sentences


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_with_span(tokenizer, text: str, phrase: str) -> tuple[list[int], tuple[int, int]]:
    """Token ids of ``text`` and the [start, stop) token span covering the first ``phrase`` in it."""
    at = text.find(phrase)
    if at < 0:
        raise HeadscopeError(f"{phrase!r} does not occur in {text!r}")
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        inside = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < at + len(phrase) and b > at]
        return list(enc["input_ids"]), (inside[0], inside[-1] + 1)
    except (NotImplementedError, TypeError, KeyError, IndexError):  # a slow tokenizer: find the phrase's ids instead
        ids = _encode(tokenizer, text)
        for piece in (_encode(tokenizer, " " + phrase), _encode(tokenizer, phrase)):
            for i in range(len(ids) - len(piece) + 1):
                if piece and ids[i : i + len(piece)] == piece:
                    return ids, (i, i + len(piece))
    raise HeadscopeError(
        f"could not find the tokens of {phrase!r} inside {text!r} with this tokenizer; use a fast tokenizer"
    )


def _bos(tokenizer) -> list[int]:
    """The BOS id if the tokenizer puts one in front of its inputs by default."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if ids and ids[0] == bos else []


class NeedleTask:
    """Builds the length x depth grid of needle trials for one tokenizer.

    ``use_chat_template``: "auto" uses the tokenizer's chat template when it has one (reference).
    """

    def __init__(
        self,
        tokenizer,
        needles: Sequence[Needle] | str | Path | None = None,
        haystack: Sequence[str] | str | Path | None = None,
        lengths: Sequence[int] = tuple(np.linspace(1000, 50000, 20).astype(int)),
        depths: Sequence[float] = tuple(np.linspace(0, 100, 10)),
        template: str = DEFAULT_TEMPLATE,
        use_chat_template: bool | str = "auto",
        max_positions: int | None = None,
    ):
        self.tokenizer = tokenizer
        self.needles = list(needles) if isinstance(needles, (list, tuple)) else load_needles(needles)
        self.sentences = list(haystack) if isinstance(haystack, (list, tuple)) else load_haystack(haystack)
        self.lengths = [int(n) for n in lengths]
        self.depths = [float(d) for d in depths]
        bad_depths = [d for d in self.depths if not 0 <= d <= 100]
        if bad_depths:
            raise HeadscopeError(f"depths must lie in [0, 100] (percent of the context); got {bad_depths}")
        if "{question}" not in template:
            raise HeadscopeError("the question template must contain '{question}'")
        self.template = template
        if use_chat_template == "auto":
            use_chat_template = bool(getattr(tokenizer, "chat_template", None))
        elif use_chat_template and not getattr(tokenizer, "chat_template", None):
            raise HeadscopeError("this tokenizer has no chat template; use --chat-template off (or auto)")
        self.use_chat_template = bool(use_chat_template)
        self.max_positions = max_positions
        self._sentence_ids = [_encode(tokenizer, " " + s) for s in self.sentences]

    # ----------------------------------------------------------------- prompt pieces
    def _wrappers(self, needle: Needle) -> tuple[list[int], list[int]]:
        """Token ids before and after the haystack (BOS, chat turns, the question)."""
        question = self.template.format(question=needle.question)
        if not self.use_chat_template:
            return _bos(self.tokenizer), _encode(self.tokenizer, "\n" + question)
        rendered = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": _CHAT_PLACEHOLDER + "\n" + question}],
            tokenize=False,
            add_generation_prompt=True,
        )
        before, after = rendered.split(_CHAT_PLACEHOLDER)
        return _encode(self.tokenizer, before), _encode(self.tokenizer, after)

    def _filler(self, n_tokens: int) -> tuple[list[int], list[int]]:
        """Filler ids of exactly ``n_tokens`` and the positions where sentences start."""
        ids: list[int] = []
        starts: list[int] = []
        i = 0
        while len(ids) < n_tokens:
            starts.append(len(ids))
            ids.extend(self._sentence_ids[i % len(self._sentence_ids)])
            i += 1
        return ids[:n_tokens], [s for s in starts if s <= n_tokens]

    def build(self, needle: Needle, length: int, depth: float, needle_index: int = 0) -> NeedleTrial:
        """One trial: needle at ``depth`` percent of the haystack, moved back to a sentence start."""
        head, tail = self._wrappers(needle)
        needle_ids, (a, b) = encode_with_span(self.tokenizer, " " + needle.needle, needle.span_text)
        answer_ids = _encode(self.tokenizer, " " + needle.answer)
        unknown = getattr(self.tokenizer, "unk_token_id", None)
        span_ids = needle_ids[a:b]
        copied = needle.answer_span is not None or set(answer_ids) <= set(needle_ids)
        if not answer_ids or not span_ids or unknown in answer_ids + span_ids or not copied:
            raise HeadscopeError(
                f"this tokenizer cannot read needle {needle_index} ({needle.needle!r}): the answer's tokens "
                f"{self.tokenizer.convert_ids_to_tokens(answer_ids)} are unknown or do not occur among the needle's "
                f"tokens, so no head could copy them; write needles in text this tokenizer knows"
            )
        n_hay = length - len(head) - len(tail)
        if n_hay < len(needle_ids):
            raise HeadscopeError(
                f"context length {length} is too short for the needle: the needle takes {len(needle_ids)} "
                f"tokens and the question/template {len(head) + len(tail)}; use lengths >= "
                f"{len(needle_ids) + len(head) + len(tail)}"
            )
        if self.max_positions is not None and length + len(answer_ids) > self.max_positions:
            raise HeadscopeError(
                f"context length {length} plus the {len(answer_ids)}-token answer exceeds the model's "
                f"{self.max_positions} positions; use lengths <= {self.max_positions - len(answer_ids)}"
            )
        filler, starts = self._filler(n_hay - len(needle_ids))
        target = int(len(filler) * depth / 100)
        insert_at = max(s for s in starts if s <= target)  # back to the previous sentence end
        prompt = head + filler[:insert_at] + needle_ids + filler[insert_at:] + tail
        start = len(head) + insert_at
        return NeedleTrial(
            prompt_ids=prompt,
            needle_span=(start, start + len(needle_ids)),
            answer_span=(start + a, start + b),
            answer_ids=answer_ids,
            answer=needle.answer,
            length=length,
            depth=depth,
            needle_index=needle_index,
        )

    def trials(self) -> list[NeedleTrial]:
        """The full grid: every length x depth x needle."""
        return [
            self.build(needle, length, depth, i)
            for length in self.lengths
            for depth in self.depths
            for i, needle in enumerate(self.needles)
        ]


def normalize_answer(text: str) -> str:
    return re.sub(r"\s+", "", text).lower()


def is_correct(generated: str, answer: str) -> bool:
    """Exact-match accuracy: the answer appears in the generated text (whitespace and case ignored)."""
    return normalize_answer(answer) in normalize_answer(generated)


def words(text: str) -> list[str]:
    """ROUGE's word tokens: lower-cased runs of letters and digits (rouge_score's default tokenizer on
    ASCII text; it drops non-ASCII letters, these are kept)."""
    return re.findall(r"[^\W_]+", text.lower())


def rouge1_recall(generated: str, reference: str) -> float:
    """Word-level ROUGE-1 recall of ``reference`` in ``generated`` (clipped counts), the reference's
    trial filter (Wu et al. 2024: recall of the needle's answer phrase in the response > 0.5).

    On text, a wrong number sharing digits with the answer scores 0 ("51296" vs "81265"); on token
    ids of a tokenizer that splits numbers it would not.
    """
    target = words(reference)
    if not target:
        return 0.0
    pool: dict[str, int] = {}
    for w in words(generated):
        pool[w] = pool.get(w, 0) + 1
    hits = 0
    for w in target:
        if pool.get(w, 0) > 0:
            pool[w] -= 1
            hits += 1
    return hits / len(target)
