"""In-context-learning tasks as data: a JSONL of ``{"input": x, "output": y}`` pairs (the format of
the Function Vectors datasets, Todd et al. 2024), a seeded train / validation / test split, and
k-shot prompts (Park & Rhee 2025; docs/METHODS.md, "Soft injection")::

    task = IclTask.load("antonym.jsonl", seed=0)
    fmt = PromptFormat()                                   # "Q: x\\nA: y" pairs joined by "\\n\\n"
    fmt.prompt([("hot", "cold")], "up")                    # 'Q: hot\\nA: cold\\n\\nQ: up\\nA:'
    batch = encode(tok, [fmt.prompt(demos, x)], [y])       # left-padded ids + first target token

The model's answer is scored on the first token of the target, as the reference does.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from headscope.data import read_jsonl
from headscope.errors import HeadscopeError
from headscope.hf.inputs import pad_id

Pair = tuple[str, str]
SPLITS = ("train", "val", "test")


@dataclass
class IclTask:
    """A named list of (input, output) pairs, split once with a seed into train / val / test."""

    name: str
    pairs: list[Pair]
    seed: int = 0
    fractions: tuple[float, float, float] = (0.5, 0.25, 0.25)
    splits: dict[str, list[Pair]] = field(init=False, repr=False)

    def __post_init__(self):
        if len(self.fractions) != 3 or any(f < 0 for f in self.fractions) or sum(self.fractions) <= 0:
            raise HeadscopeError(f"split fractions must be three non-negative numbers (train, val, test); got {self.fractions}")
        order = list(self.pairs)
        random.Random(self.seed).shuffle(order)
        total = sum(self.fractions)
        n_train = int(round(len(order) * self.fractions[0] / total))
        n_val = int(round(len(order) * self.fractions[1] / total))
        self.splits = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
        for name, rows in self.splits.items():
            if not rows and self.fractions[SPLITS.index(name)] > 0:
                raise HeadscopeError(
                    f"task {self.name!r}: the {name} split is empty ({len(order)} pairs, fractions {self.fractions}); "
                    "add pairs to the JSONL or change the split fractions"
                )

    @classmethod
    def load(cls, path, *, seed: int = 0, fractions=(0.5, 0.25, 0.25)) -> "IclTask":
        """Read a JSONL of ``{"input": ..., "output": ...}`` lines (other keys are ignored)."""
        hint = 'each line must be {"input": ..., "output": ...}'
        pairs = []
        for lineno, row in read_jsonl(path, "task file", hint):
            if not isinstance(row, dict) or "input" not in row or "output" not in row:
                keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise HeadscopeError(f"{path}:{lineno} lacks 'input' or 'output' (has {keys}); {hint}")
            output = row["output"][0] if isinstance(row["output"], list) and row["output"] else row["output"]
            pairs.append((str(row["input"]), str(output)))
        if not pairs:
            raise HeadscopeError(f"task file {path} holds no pairs; {hint}")
        return cls(Path(path).stem, pairs, seed, tuple(fractions))

    def __getitem__(self, split: str) -> list[Pair]:
        if split not in self.splits:
            raise HeadscopeError(f"unknown split {split!r}; choose one of {SPLITS}")
        return self.splits[split]

    def check_shots(self, k: int, split: str = "train") -> None:
        if k > len(self[split]):
            raise HeadscopeError(
                f"task {self.name!r} has {len(self[split])} {split} pairs, fewer than {k} shots; "
                "use fewer shots (--shots) or a task file with more pairs"
            )

    def examples(self, split: str, k: int, *, n: int | None = None, seed: int = 0,
                 demo_split: str = "train") -> list[tuple[list[Pair], Pair]]:
        """(demonstrations, query) per query of ``split``: k demos drawn from ``demo_split`` (never
        the query itself). ``n``: draw n queries with replacement instead of taking each once."""
        self.check_shots(k + (split == demo_split), demo_split)
        rng = random.Random(seed)
        queries = list(self[split]) if n is None else [rng.choice(self[split]) for _ in range(n)]
        out = []
        for q in queries:
            pool = [p for p in self[demo_split] if p != q]
            if len(pool) < k:  # the file repeats this pair: its copies cannot be demonstrations
                raise HeadscopeError(
                    f"task {self.name!r}: the {demo_split} pairs other than query {q[0]!r} -> {q[1]!r} are only "
                    f"{len(pool)}, fewer than {k} shots (the file repeats that pair); remove the repeated pairs "
                    "or use fewer shots (--shots)")
            out.append((rng.sample(pool, k), q))
        return out


@dataclass(frozen=True)
class PromptFormat:
    """How pairs become a prompt: ``template`` per pair ({x}, {y}), pairs joined by ``separator``;
    the query is the template cut before ``{y}`` (trailing spaces dropped), the target is the rest.
    ``chat``: wrap the prompt as one user turn with the tokenizer's chat template."""

    template: str = "Q: {x}\nA: {y}"
    separator: str = "\n\n"
    chat: bool = False

    def __post_init__(self):
        if self.template.count("{x}") != 1 or self.template.count("{y}") != 1 or not self.template.endswith("{y}"):
            raise HeadscopeError(f"the template needs one {{x}} and end with one {{y}}, e.g. 'Q: {{x}}\\nA: {{y}}'; got {self.template!r}")

    def prompt(self, demos: Sequence[Pair], query: str) -> str:
        head = self.template[: -len("{y}")]
        shown = [self.template.replace("{x}", x).replace("{y}", y) for x, y in demos]
        return self.separator.join(shown + [head.rstrip().replace("{x}", query)])

    def target(self, y: str) -> str:
        """The text that follows the prompt: the template's whitespace before {y}, then y."""
        head = self.template[: -len("{y}")]
        return head[len(head.rstrip()):] + y if not self.chat else y

    def to_dict(self) -> dict:
        return {"template": self.template, "separator": self.separator, "chat": self.chat}


@dataclass
class Batch:
    input_ids: torch.Tensor       # [B, S], left-padded
    attention_mask: torch.Tensor  # [B, S]
    target: torch.Tensor          # [B] first token of each target

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.target.to(device))

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def _render(tokenizer, fmt: PromptFormat, prompt: str) -> list[int]:
    if fmt.chat:
        if getattr(tokenizer, "chat_template", None) is None:
            raise HeadscopeError("the tokenizer has no chat template; drop --chat-template (or use chat=False)")
        return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=False))
    return tokenizer(prompt)["input_ids"]


def encode(tokenizer, examples: Sequence[tuple[Sequence[Pair], Pair]], fmt: PromptFormat = PromptFormat()) -> Batch:
    """Tokenize (demos, query) examples into a left-padded batch and each target's first token.

    The target's tokens are those the full text adds after the prompt (so BPE merges are honoured);
    a target that adds none, or starts with the unknown token (a word outside a word-level
    vocabulary), is an error.
    """
    rows, targets = [], []
    unk = getattr(tokenizer, "unk_token_id", None)
    for demos, (x, y) in examples:
        text = fmt.prompt(demos, x)
        ids = _render(tokenizer, fmt, text)
        full = [] if fmt.chat else tokenizer(text + fmt.target(y))["input_ids"]
        if full[: len(ids)] == ids and len(full) > len(ids):
            added = full[len(ids):]
        else:
            added = tokenizer(fmt.target(y), add_special_tokens=False)["input_ids"]
        if not added or added[0] == unk:  # nothing, or a word the vocabulary does not have
            raise HeadscopeError(
                f"target {y!r} (of input {x!r}) tokenizes to nothing with this model's tokenizer; "
                "use a task file made for this model's vocabulary"
            )
        rows.append(ids)
        targets.append(added[0])
    pad = pad_id(tokenizer)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return Batch(input_ids, mask, torch.tensor(targets))


def batches(tokenizer, examples, fmt: PromptFormat, batch_size: int):
    for i in range(0, len(examples), batch_size):
        yield encode(tokenizer, examples[i:i + batch_size], fmt)
