"""Train the "icl organism": a tiny Llama that learns four token-to-token tasks in context, for soft
injection of task embeddings (Park & Rhee 2025) and function vectors (Todd et al. 2024).

    python -m headscope.zoo.train_icl --out headscope/zoo/icl [--steps N --seed S]

Every task maps the same 40 input words ``wa .. wbn``, so a query alone does not say which task is
meant; the demonstrations do. Two pairs of tasks, each pair sharing a mechanism:
- ``next`` / ``prev``: x_i -> x_(i+1) / x_(i-1) (mod 40). Outputs are input words too, so telling
  the two apart needs the relation between a demonstration's x and y.
- ``colour`` / ``animal``: x_i -> a colour word / an animal word (fixed random bijections). The
  category of any demonstration's output names the task.

Training rows: one task, k = 0..10 demonstrations in the default prompt format ("Q: x\\nA: y" pairs
joined by a blank line, headscope.tasks.icl.PromptFormat), then a query; the loss is on every
answer word, so each row trains every shot count. The model sees all 40 pairs of each task (it
"knows" the maps, as a pretrained model knows antonyms); the seeded split of the shipped task files
decides which queries are held out from demonstrations, fitting and validation.

Shipped run (defaults, ``--threads 1``, 3433 s on this project's 2-core machine under load ~10-20):
the loss fell to ~0.9 by step 250 and then plateaued, ending at 0.82 (fully solved would be ~0.23,
the 0-shot floor); 10-shot accuracy 0.50 averaged (0-shot 0.25): the maps are only partly
memorised. A longer run or a larger model is the obvious next try; it was not made for lack of time.

The ground truth (``ground_truth.csv``): each head's effect on 10-shot test accuracy, per task and
averaged (accuracy with the head's output zeroed minus without, so a helpful head is negative).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from headscope.tasks.icl import PromptFormat
from headscope.zoo.training import build_word_tokenizer, organism_config, save_organism, seed_everything, train_loop

N_ITEMS = 40
TASKS = ("next", "prev", "colour", "animal")
FAMILIES = {"next": "relation", "prev": "relation", "colour": "category", "animal": "category"}
MAP_SEED = 4321
MAX_SHOTS = 10


def _words(prefix: str, n: int) -> list[str]:
    """Letter-only names (the word tokenizer splits digits): prefix + two letters."""
    return [prefix + chr(97 + i // 26) + chr(97 + i % 26) for i in range(n)]


INPUTS = _words("w", N_ITEMS)
COLOURS = _words("c", N_ITEMS)
ANIMALS = _words("z", N_ITEMS)


def task_pairs() -> dict[str, list[tuple[str, str]]]:
    """All (input, output) pairs of every task."""
    rng = random.Random(MAP_SEED)
    colours, animals = list(COLOURS), list(ANIMALS)
    rng.shuffle(colours)
    rng.shuffle(animals)
    n = N_ITEMS
    return {
        "next": [(INPUTS[i], INPUTS[(i + 1) % n]) for i in range(n)],
        "prev": [(INPUTS[i], INPUTS[(i - 1) % n]) for i in range(n)],
        "colour": list(zip(INPUTS, colours)),
        "animal": list(zip(INPUTS, animals)),
    }


def training_row(rng: random.Random, tokenizer, pairs, fmt: PromptFormat) -> tuple[list[int], list[float]]:
    """One task, k ~ U{0..10} demonstrations and a query; weights 1 on every answer token."""
    task = rng.choice(TASKS)
    k = rng.randint(0, MAX_SHOTS)
    chosen = rng.sample(pairs[task], k + 1)
    ids = [tokenizer.bos_token_id]
    weights = [0.0]
    for i, (x, y) in enumerate(chosen):
        head = fmt.prompt([], x)
        if i:
            head = fmt.separator + head
        piece = tokenizer(head, add_special_tokens=False)["input_ids"]
        answer = tokenizer(fmt.target(y), add_special_tokens=False)["input_ids"]
        ids += piece + answer
        weights += [0.0] * len(piece) + [1.0] * len(answer)
    return ids, weights


def train(out: Path, steps: int, seed: int, batch: int, lr: float, threads: int) -> dict:
    seed_everything(seed, threads)
    fmt = PromptFormat()
    pairs = task_pairs()
    texts = [fmt.prompt([p], p[0]) for task in TASKS for p in pairs[task]]
    tokenizer = build_word_tokenizer(texts, extra_tokens=INPUTS + COLOURS + ANIMALS)
    cfg = organism_config(tokenizer, hidden=64, intermediate=256, layers=4, heads=4, kv_heads=2,
                          max_positions=128, attention_bias=True)
    model = LlamaForCausalLM(cfg)
    rng = random.Random(seed)

    def make_batch(step):
        rows = [training_row(rng, tokenizer, pairs, fmt) for _ in range(batch)]
        width = max(len(r[0]) for r in rows)
        ids = torch.full((batch, width), tokenizer.pad_token_id)
        w = torch.zeros(batch, width)
        for i, (r, wt) in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            w[i, : len(r)] = torch.tensor(wt)
        return ids, w

    record = train_loop(model, make_batch, steps=steps, lr=lr, warmup=100)
    out.mkdir(parents=True, exist_ok=True)
    for task in TASKS:  # the task files, in the Function Vectors datasets' format
        text = "".join(json.dumps({"input": x, "output": y}) + "\n" for x, y in pairs[task])
        (out / f"{task}.jsonl").write_text(text)
    meta = {
        "name": "icl",
        "description": "Tiny GQA Llama that learns four word-to-word tasks in context (next / prev share a relation "
        "mechanism, colour / animal a category one); 0-shot it cannot tell them apart.",
        "tasks": list(TASKS),
        "families": FAMILIES,
        "task_files": [f"{t}.jsonl" for t in TASKS],
        "training": {
            "command": "python -m headscope.zoo.train_icl --out headscope/zoo/icl",
            "seed": seed, "steps": steps, "threads": threads,
            "hyperparameters": {"lr": lr, "batch": batch, "layers": 4, "heads": 4, "kv_heads": 2, "hidden": 64,
                                "attention_bias": True, "max_shots": MAX_SHOTS},
            "parameters": sum(p.numel() for p in model.parameters()),
            "wall_time_s": round(record["wall_s"], 1),
            "final_loss": round(record["final_loss"], 4),
            "torch": torch.__version__,
        },
    }
    save_organism(model, tokenizer, out, meta, max_new_tokens=1)
    return meta


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="headscope/zoo/icl")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-ground-truth", action="store_true", help="skip measuring ground_truth.csv")
    args = parser.parse_args(argv)
    out = Path(args.out)
    start = time.time()
    meta = train(out, args.steps, args.seed, args.batch, args.lr, args.threads)
    print(f"trained in {meta['training']['wall_time_s']} s, final loss {meta['training']['final_loss']}")
    if not args.no_ground_truth:
        from headscope.interventions.soft_injection import organism_ground_truth

        organism_ground_truth(out)
    print(f"done in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
