"""Train the "multitask organism": a tiny Llama trained on three synthetic tasks, two of which share
one mechanism (find the earlier copy of the current token, copy the token after it) and one that
does not (a fixed token-to-token map, solvable without attention).

    python -m headscope.zoo.train_multitask --out headscope/zoo/multitask [--steps N --seed S]

Tasks (word tokens, one token per word; the pair generators below are the evaluation's too):
- ``induction``: "ind s1 .. sP s1 .. s5" -> s6 (a random sequence of P = 8..14 tokens, repeated).
- ``kv``: "kv k1 v1 .. k6 v6 ? k3" -> v3 (key-value lookup in context).
- ``map``: "map x1 y1 .. x5 y5 x6" -> f(x6), with y = f(x) a fixed random bijection.
Clean/corrupt pairs change one earlier token (induction, kv) or the last token (map), so the
answer moves; the metric is the logit difference between the two answers.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from headscope.tasks.circuit_pairs import CircuitPair
from headscope.zoo.training import organism_config, build_word_tokenizer, seed_everything, train_loop

def _words(prefix: str, n: int) -> list[str]:
    """Letter-only names (the word tokenizer splits digits): prefix + two letters."""
    return [prefix + chr(97 + i // 26) + chr(97 + i % 26) for i in range(n)]


SEQ = _words("s", 40)
KEYS = _words("k", 20)
VALUES = _words("v", 20)
XS = _words("x", 24)
YS = _words("y", 24)
TASKS = ("induction", "kv", "map")
MAP_SEED = 1234
SCHEDULE = ("induction", "kv", "map", "kv")  # the lookup task is the slowest to learn: twice as many batches


def mapping() -> dict[str, str]:
    """The fixed bijection f: x -> y of the map task."""
    ys = list(YS)
    random.Random(MAP_SEED).shuffle(ys)
    return dict(zip(XS, ys))


def _induction(rng: random.Random, period: int | None = None) -> tuple[list[str], list[str], str, str]:
    """A random sequence of ``period`` [8..14, random] tokens, then its first 5 tokens again."""
    period = period or rng.randint(8, 14)
    seq = rng.sample(SEQ, period + 1)
    first, spare = seq[:period], seq[period]
    prompt = ["ind"] + first + first[:5]
    corrupt = list(prompt)
    corrupt[1 + 5] = spare  # the token after the earlier copy of s5
    return prompt, corrupt, first[5], spare


def _kv(rng: random.Random, extra_queries: int = 0) -> tuple[list[str], list[str], str, str]:
    """The pair; with ``extra_queries`` (training) more "? k v" lookups follow the answer."""
    keys, values = rng.sample(KEYS, 6), rng.sample(VALUES, 7)
    q = rng.randrange(6)
    prompt = ["kv"] + [t for kv in zip(keys, values[:6]) for t in kv] + ["?", keys[q]]
    corrupt = list(prompt)
    corrupt[1 + 2 * q + 1] = values[6]
    for _ in range(extra_queries):
        r = rng.randrange(6)
        prompt = prompt + ([values[q]] if len(prompt) == 15 else []) + ["?", keys[r], values[r]]
    return prompt, corrupt, values[q], values[6]


def _map(rng: random.Random) -> tuple[list[str], list[str], str, str]:
    f = mapping()
    xs = rng.sample(XS, 7)
    prompt = ["map"] + [t for x in xs[:5] for t in (x, f[x])] + [xs[5]]
    corrupt = prompt[:-1] + [xs[6]]
    return prompt, corrupt, f[xs[5]], f[xs[6]]


_MAKERS = {"induction": _induction, "kv": _kv, "map": _map}


def task_pairs(task: str, n: int = 32, seed: int = 0, period: int | None = None) -> list[CircuitPair]:
    """``n`` seeded clean/corrupt pairs of one task (answer = clean continuation, wrong = corrupt's).

    ``period`` fixes the induction repeat period (default: random in 8..14)."""
    if task not in _MAKERS:
        raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        clean, corrupt, answer, wrong = _induction(rng, period) if task == "induction" else _MAKERS[task](rng)
        out.append(CircuitPair(" ".join(clean), " ".join(corrupt), answer, wrong))
    return out


def training_text(task: str, rng: random.Random, period: int = 12) -> tuple[str, int]:
    """One training sequence (a clean prompt + its answer) and how many final tokens carry the loss.

    Induction sequences repeat after ``period`` tokens (one period per batch, so no padding);
    varying it rules out a fixed-offset positional shortcut."""
    if task == "induction":  # the whole repeat is predictable: continue it to the end
        seq = rng.sample(SEQ, period)
        return " ".join(["ind"] + seq + seq), period - 1
    if task == "kv":  # the first lookup is the evaluated prompt; 6 more lookups follow
        tokens = _kv(rng, extra_queries=6)[0]
        return " ".join(tokens), 0
    pair = task_pairs(task, 1, rng.randrange(1 << 30))[0]
    return pair.clean + " " + pair.answer, 6


def build_tokenizer():
    return build_word_tokenizer([" ".join(["ind", "kv", "map", "?"] + SEQ + KEYS + VALUES + XS + YS)])


def make_batch_fn(tokenizer, batch: int, seed: int, periods: tuple[int, int] = (8, 14)):
    rng = random.Random(seed)

    def make(step: int):
        task = SCHEDULE[step % len(SCHEDULE)]
        period = rng.randint(*periods)
        rows, weights = [], []
        for _ in range(batch):
            text, n_loss = training_text(task, rng, period)
            ids = tokenizer(text)["input_ids"]
            w = [0.0] * len(ids)
            if task == "map":  # every y after its x is predictable
                w = [1.0 if i >= 2 and i % 2 == 1 else 0.0 for i in range(len(ids))]
            elif task == "kv":  # every value after "? key" is predictable: positions 16, 19, 22, ...
                w = [1.0 if i >= 16 and (i - 16) % 3 == 0 else 0.0 for i in range(len(ids))]
            else:
                w[-n_loss:] = [1.0] * n_loss
            rows.append(ids)
            weights.append(w)
        return torch.tensor(rows), torch.tensor(weights)

    return make


@torch.no_grad()
def accuracy(model, tokenizer, task: str, n: int = 64, seed: int = 999, period: int | None = None) -> float:
    right = 0
    for p in task_pairs(task, n, seed, period):  # induction prompts differ in length: one at a time
        ids = torch.tensor([tokenizer(p.clean)["input_ids"]])
        right += int(model(ids).logits[0, -1].argmax()) == tokenizer(p.answer, add_special_tokens=False)["input_ids"][0]
    return right / n


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="headscope/zoo/multitask")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (1 trains faster on a crowded box)")
    p.add_argument("--periods", default="8,14", help="induction repeat periods, min,max (equal: fixed period)")
    args = p.parse_args(argv)

    seed_everything(args.seed, threads=args.threads)
    tokenizer = build_tokenizer()
    config = organism_config(tokenizer, hidden=args.hidden, intermediate=4 * args.hidden, layers=args.layers,
                             heads=args.heads, kv_heads=args.kv_heads, max_positions=64)
    model = LlamaForCausalLM(config)
    start = time.time()
    stats = train_loop(model, make_batch_fn(tokenizer, args.batch, args.seed, tuple(int(x) for x in args.periods.split(","))), steps=args.steps, lr=args.lr,
                       log_every=50)
    low, high = (int(x) for x in args.periods.split(","))
    acc = {task: accuracy(model, tokenizer, task, period=low if low == high else None) for task in TASKS}
    wall = time.time() - start
    print(f"accuracy {acc}  wall {wall:.0f}s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    meta = {
        "name": "multitask",
        "description": "Tiny GQA Llama trained on induction, in-context key-value lookup (both: find the "
                       "earlier copy, copy the next token) and a fixed token map (no attention needed).",
        "tasks": list(TASKS),
        "training": {
            "command": "python -m headscope.zoo.train_multitask " + " ".join(sys.argv[1:] if argv is None else argv),
            "seed": args.seed, "steps": args.steps,
            "hyperparameters": {k: v for k, v in vars(args).items() if k not in ("out", "seed", "steps", "threads")},
            "parameters": sum(p.numel() for p in model.parameters()),
            "wall_time_s": round(wall, 1), "final_loss": round(stats["final_loss"], 4),
            "accuracy": {k: round(v, 4) for k, v in acc.items()}, "torch": torch.__version__,
        },
    }
    (out / "organism.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"saved to {out}")


if __name__ == "__main__":
    main()
