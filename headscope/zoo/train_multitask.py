"""Train the "multitask organism": a tiny Llama trained on three synthetic tasks, two of which share
one mechanism (find the earlier copy of the current token, copy the token after it: induction) and
one that does not (a fixed token-to-token map, solvable without attention).

    python -m headscope.zoo.train_multitask --out headscope/zoo/multitask [--steps N --seed S]

Evaluation tasks (word tokens, one token per word; ``task_pairs`` makes the clean/corrupt pairs):
- ``induction``: "ind s1 .. sP s1 .. s5" -> s6 (a random sequence of P = 8..14 tokens, repeated).
- ``kv``: "kv k1 v1 .. k6 v6 ? k3" -> v3 (key-value lookup in context).
- ``map``: "map x1 y1 .. x5 y5 x6" -> f(x6), with y = f(x) a fixed random bijection.
Clean/corrupt pairs change one earlier token (induction, kv) or the last token (map), so the
answer moves; the metric is the logit difference between the two answers.

Training rows (``training_row``), mixed in every batch and right-padded to ``LENGTH`` tokens:
- induction: filler, a random segment S of 4..14 words, 0..16 filler words, S again; the loss is
  on S's second copy. The copy distance varies, so only content predicts it (a fixed period let
  layer-0 heads attend at a fixed offset instead); S is drawn from every content word (keys and
  values too), so the induction circuit also serves the kv lookup.
- kv: 3..8 key-value pairs, then "? key value" lookups to the end; the loss is on the values.
- map: 12 "x f(x)" pairs; the loss is on every f(x).
Attention projections have biases (``--attention-bias``, on): with RoPE and no biases, no layer-0
head found the previous token within 8000 steps (a relative-offset pattern needs a
token-independent query/key direction, which biases give for free).

Shipped run (defaults, ``--threads 1``, 376 s): the loss sits near 1.8 until step ~4000, then drops
to 0.02 (the induction circuit forms); accuracy 1.0 on all three tasks. A 4000-step schedule (its
learning rate decays before the drop) and a 1e-3 head-output group-lasso penalty both stayed at
~1.8 (induction 0.08 / 0.25 accuracy).
"""

from __future__ import annotations

import argparse
import random
import sys
import time

import torch
from transformers import LlamaForCausalLM

from headscope.tasks.circuit_pairs import CircuitPair
from headscope.zoo.training import build_word_tokenizer, organism_config, save_organism, seed_everything, train_loop

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


def _kv(rng: random.Random) -> tuple[list[str], list[str], str, str]:
    keys, values = rng.sample(KEYS, 6), rng.sample(VALUES, 7)
    q = rng.randrange(6)
    prompt = ["kv"] + [t for kv in zip(keys, values[:6]) for t in kv] + ["?", keys[q]]
    corrupt = list(prompt)
    corrupt[1 + 2 * q + 1] = values[6]
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


LENGTH = 48  # training row length in words
CONTENT = SEQ + KEYS + VALUES + XS + YS


def training_row(task: str, rng: random.Random) -> tuple[list[str], list[float]]:
    """One training row (words) and its per-word loss weights (1 = predict this word)."""
    if task == "induction":
        period = rng.randint(4, 14)
        segment = rng.sample(CONTENT, period)
        others = [t for t in CONTENT if t not in segment]
        lead, gap = rng.randint(0, 6), rng.randint(0, 16)
        filler = [rng.choice(others) for _ in range(lead + gap)]
        words = ["ind"] + filler[:lead] + segment + filler[lead:] + segment
        weights = [0.0] * (len(words) - period + 1) + [1.0] * (period - 1)
    elif task == "kv":
        n = rng.randint(3, 8)
        keys, values = rng.sample(KEYS, n), rng.sample(VALUES, n)
        words = ["kv"] + [t for kv in zip(keys, values) for t in kv]
        weights = [0.0] * len(words)
        while len(words) + 3 <= LENGTH:
            r = rng.randrange(n)
            words += ["?", keys[r], values[r]]
            weights += [0.0, 0.0, 1.0]
    else:
        f = mapping()
        words = ["map"] + [t for x in rng.sample(XS, 12) for t in (x, f[x])]
        weights = [0.0] + [float(i % 2 == 1) for i in range(len(words) - 1)]
    return words[:LENGTH], weights[:LENGTH]


def build_tokenizer():
    return build_word_tokenizer([" ".join(["ind", "kv", "map", "?"] + CONTENT)])


def make_batch_fn(tokenizer, batch: int, seed: int):
    """Batches of ``batch`` rows, the three tasks in turn, right-padded (padding carries no loss)."""
    rng = random.Random(seed)

    def make(step: int):
        rows, weights = [], []
        for i in range(batch):
            words, w = training_row(TASKS[i % len(TASKS)], rng)
            ids = tokenizer(" ".join(words))["input_ids"]
            w = [0.0] * (len(ids) - len(words)) + w  # <bos>
            pad = LENGTH + 1 - len(ids)
            rows.append(ids + [tokenizer.pad_token_id] * pad)
            weights.append(w + [0.0] * pad)
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
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--attention-bias", action=argparse.BooleanOptionalAction, default=True,
                   help="biases on the attention projections (see the module docstring)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 trains faster on a crowded box)")
    args = p.parse_args(argv)

    seed_everything(args.seed, threads=args.threads)
    tokenizer = build_tokenizer()
    config = organism_config(tokenizer, hidden=args.hidden, intermediate=4 * args.hidden, layers=args.layers,
                             heads=args.heads, kv_heads=args.kv_heads, max_positions=64,
                             attention_bias=args.attention_bias)
    model = LlamaForCausalLM(config)
    start = time.time()
    stats = train_loop(model, make_batch_fn(tokenizer, args.batch, args.seed), steps=args.steps, lr=args.lr,
                       log_every=100)
    acc = {task: accuracy(model, tokenizer, task) for task in TASKS}
    print(f"accuracy {acc}  wall {time.time() - start:.0f}s")
    meta = {
        "name": "multitask",
        "description": "Tiny GQA Llama trained on induction, in-context key-value lookup (both: find the "
                       "earlier copy, copy the next token) and a fixed token map (no attention needed).",
        "tasks": list(TASKS),
        "training": {
            "command": "python -m headscope.zoo.train_multitask " + " ".join(sys.argv[1:] if argv is None else argv),
            "seed": args.seed, "steps": args.steps,
            "hyperparameters": {k: v for k, v in vars(args).items() if k not in ("out", "seed", "steps", "threads")},
            "threads": args.threads,
            "parameters": sum(p.numel() for p in model.parameters()),
            "wall_time_s": round(time.time() - start, 1), "final_loss": round(stats["final_loss"], 4),
            "accuracy": {k: round(v, 4) for k, v in acc.items()}, "torch": torch.__version__,
            "accuracy_note": "greedy accuracy on 64 held-out prompts per task (task_pairs, seed 999; "
                             "induction periods 8..14)",
        },
    }
    save_organism(model, tokenizer, args.out, meta, max_new_tokens=1)
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
