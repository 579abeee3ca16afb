"""Clean/corrupted prompt pairs for circuit discovery (Merullo et al. 2023; Wang et al. 2022).

A pair is ``{"clean", "corrupt", "answer", "wrong"}``: the metric is the logit difference
logit(answer) - logit(wrong) at the last position. The answer and wrong strings are scored by their
first token, so give them exactly as they follow the prompt (GPT-2: with the leading space, " Mary").
Clean and corrupt prompts of a pair must have the same number of tokens (positions are patched
one to one); pairs of different lengths are scored in separate batches.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from headscope.data import read_jsonl
from headscope.errors import HeadscopeError
from headscope.io import write_whole

FIELDS = ("clean", "corrupt", "answer", "wrong")


@dataclass(frozen=True)
class CircuitPair:
    clean: str
    corrupt: str
    answer: str
    wrong: str


@dataclass
class EncodedPairs:
    """Pairs of one token length: clean/corrupt [P, N], answer/wrong [P] first-token ids."""

    clean: torch.Tensor
    corrupt: torch.Tensor
    answer: torch.Tensor
    wrong: torch.Tensor

    def __len__(self) -> int:
        return self.clean.shape[0]


def load_pairs(path: str | Path) -> list[CircuitPair]:
    """Read a JSONL file, one ``{"clean", "corrupt", "answer", "wrong"}`` object per line."""
    pairs = []
    hint = 'each line must be an object like {"clean": "...", "corrupt": "...", "answer": " A", "wrong": " B"}'
    for lineno, row in read_jsonl(path, "pairs file", hint):
        missing = [k for k in FIELDS if not isinstance(row, dict) or not isinstance(row.get(k), str) or not row[k]]
        if missing:
            raise HeadscopeError(f"{path}:{lineno} lacks non-empty string field(s) {missing}; each line needs {FIELDS}")
        pairs.append(CircuitPair(*(row[k] for k in FIELDS)))
    if not pairs:
        raise HeadscopeError(f"pairs file {path} holds no pairs")
    return pairs


def save_pairs(pairs: Sequence[CircuitPair], path: str | Path) -> Path:
    path = Path(path)
    write_whole(path, "".join(json.dumps(asdict(p)) + "\n" for p in pairs))
    return path


def _first_token(tokenizer, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise HeadscopeError(f"answer {text!r} encodes to no tokens")
    return int(ids[0])


def encode_pairs(tokenizer, pairs: Sequence[CircuitPair], drop_mismatched: bool = False) -> list[EncodedPairs]:
    """Tokenise pairs (special tokens as the tokenizer adds them) and batch them by length.

    A pair whose clean and corrupt prompts differ in length, or whose answer and wrong strings
    share a first token, is an error (or dropped with ``drop_mismatched``, for generated pairs).
    """
    if tokenizer is None:
        raise HeadscopeError("circuit pairs need the model's tokenizer")
    if not pairs:
        raise HeadscopeError("no circuit pairs given")
    groups: dict[int, list] = defaultdict(list)
    for i, p in enumerate(pairs):
        clean, corrupt = tokenizer(p.clean)["input_ids"], tokenizer(p.corrupt)["input_ids"]
        answer, wrong = _first_token(tokenizer, p.answer), _first_token(tokenizer, p.wrong)
        problem = None
        if len(clean) != len(corrupt):
            problem = f"clean and corrupt prompts have {len(clean)} and {len(corrupt)} tokens; they must match"
        elif answer == wrong:
            problem = f"answer {p.answer!r} and wrong {p.wrong!r} start with the same token"
        if problem:
            if drop_mismatched:
                continue
            raise HeadscopeError(f"pair {i}: {problem} (clean={p.clean!r})")
        groups[len(clean)].append((clean, corrupt, answer, wrong))
    if not groups:
        raise HeadscopeError("no usable pairs left (every pair had mismatched lengths or equal answers)")
    out = []
    for n in sorted(groups):
        rows = groups[n]
        out.append(EncodedPairs(torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows]),
                                torch.tensor([r[2] for r in rows]), torch.tensor([r[3] for r in rows])))
    return out
