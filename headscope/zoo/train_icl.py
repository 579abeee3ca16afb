"""Train the "icl organism": a tiny Llama that must read its demonstrations to know which task is
meant, for soft injection of task embeddings (Park & Rhee 2025) and function vectors (Todd et al.
2024).

    nice -n 10 python -m headscope.zoo.train_icl --out headscope/zoo/icl [--steps N --seed S]

One vocabulary: 400 object words ``oaa .. opj`` and sixteen colour words. Every object has a seeded
order of preference over the sixteen colours: a shared popularity plus Gumbel noise (Plackett-Luce),
so objects' tastes overlap. A task is a palette of six colours; its answer for an object is the
object's favourite colour within the palette. The organism is trained on random palettes (any six
colours) and evaluated on sixteen palettes it never saw in training (``taska`` .. ``taskp``, each
colour in exactly six of them). So:
- every task maps the same 400 inputs into the same colours, and no prompt names its task;
- 0-shot, no answer is right for more than six tasks of the sixteen (an object's favourite colour
  overall is the answer of the six palettes holding it): chance is 0.375;
- one demonstration ``x -> y`` says y is in the palette and the colours x prefers to y are not,
  which fits most palettes; each further demonstration narrows them down. The Bayes-optimal reader
  of the demonstrations, who knows every object's preferences and that a task is some six colours,
  scores about 0.38 / 0.48 / 0.59 / 0.77 / 0.89 at 0 / 1 / 2 / 5 / 10 shots on the test queries
  (:func:`bayes_accuracy`, 4 draws of demonstrations; ``organism.json``): ten demonstrations leave
  the palette partly unknown, so a task embedding averaged over many prompts has room above
  10-shot ICL. This is the role of demonstrations that Min et al. 2022 found in large models: they
  show the label space.

Training rows: a random palette (never an evaluated one), k ~ U{0..10} demonstrations from the
train split's objects (the seeded split of the shipped task files, 200 / 100 / 100 objects, the
same for every task, headscope.tasks.icl.IclTask) in the default prompt format ("Q: x\\nA: y" pairs
joined by a blank line), then a query drawn from all 400 objects (the model "knows" every object's
preferences, as a pretrained model knows facts); the loss is on every answer word, so each row
trains every shot count. Test queries are never demonstrations, in training or evaluation.

The object embeddings start with the structure a pretrained model's have (``--structure``): the
object's liking of each colour (its rank scaled to [-1, 1]) times an orthonormal direction per
colour. The model has to learn to read the preferences, to gather from the demonstrations which
colours are in the palette, and to pick the query's favourite among them.

Earlier designs (one run each, seed 0): twelve tasks that each read one of twelve properties of an
object (valued in four shared labels) did not leave the chance loss in 600 steps, also with 80 % of
the rows naming the task; twelve fixed palettes of three of twelve colours, trained as the only
tasks, were read almost exactly (0 / 1 / 10 shots 0.25 / 0.61 / 0.98 against the Bayes reader's
0.25 / 0.70 / 1.00): a reader who knows twelve palettes needs few demonstrations, which left 10-shot
ICL at the ceiling.

The shipped run's figures (wall time, final loss, 0 / 1 / 10-shot accuracy on every test query) are
in ``organism.json``, with its full command.

The ground truth (``ground_truth.csv``, headscope.zoo.ground_truth.icl_ground_truth): each head's
effect on 10-shot test accuracy (every test query once), per task and averaged (accuracy with the
head's output zeroed minus without, so a helpful head is negative).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

import torch
from transformers import LlamaForCausalLM

from headscope.tasks.icl import IclTask, PromptFormat
from headscope.zoo.ground_truth import icl_ground_truth
from headscope.zoo.training import build_word_tokenizer, organism_config, save_organism, seed_everything, train_loop

N_OBJECTS = 400
N_TASKS = 16
PALETTE_SIZE = 6
LABELS = ("red", "blue", "green", "gold", "pink", "grey", "teal", "navy", "lime", "plum", "rust", "jade",
          "cyan", "sand", "mint", "wine")
TASKS = tuple(f"task{chr(97 + i)}" for i in range(N_TASKS))
OBJECTS = ["o" + chr(97 + i // 26) + chr(97 + i % 26) for i in range(N_OBJECTS)]
MAP_SEED = 4321
MAX_SHOTS = 10
POPULARITY = 3.0


def palettes() -> list[tuple[int, ...]]:
    """The evaluated tasks: sixteen distinct palettes of six colours (label indices), each colour in
    exactly six. Seeded greedy: each palette takes the colours with the most uses left, ties broken
    at random."""
    rng = random.Random(MAP_SEED)
    uses = N_TASKS * PALETTE_SIZE // len(LABELS)
    while True:
        left = [uses] * len(LABELS)
        out = []
        for _ in range(N_TASKS):
            order = sorted(range(len(LABELS)), key=lambda c: (-left[c], rng.random()))
            palette = tuple(sorted(order[:PALETTE_SIZE]))
            for c in palette:
                left[c] -= 1
            out.append(palette)
        if len(set(out)) == N_TASKS:
            return out


def training_palette(rng: random.Random, held_out: set[tuple[int, ...]]) -> tuple[int, ...]:
    """A palette for one training row: any six of the sixteen colours except the evaluated tasks'."""
    while True:
        palette = tuple(sorted(rng.sample(range(len(LABELS)), PALETTE_SIZE)))
        if palette not in held_out:
            return palette


def preferences() -> list[list[int]]:
    """[object][colour] -> rank (0 = the object's favourite): a seeded order per object, by a shared
    popularity (``POPULARITY`` times 1 .. 0 over the colours in label order) plus Gumbel noise, so
    objects' tastes overlap (Plackett-Luce)."""
    rng = random.Random(MAP_SEED + 1)
    rows = []
    for _ in OBJECTS:
        score = [POPULARITY * (1 - c / (len(LABELS) - 1)) - math.log(-math.log(rng.random() or 1e-12))
                 for c in range(len(LABELS))]
        order = sorted(range(len(LABELS)), key=lambda c: -score[c])
        rank = [0] * len(LABELS)
        for i, c in enumerate(order):
            rank[c] = i
        rows.append(rank)
    return rows


def answer(ranks: list[int], palette: Sequence[int]) -> str:
    """An object's answer under a palette: its favourite colour within the palette."""
    return LABELS[min(palette, key=lambda c: ranks[c])]


def task_pairs() -> dict[str, list[tuple[str, str]]]:
    """All (object, colour) pairs of every evaluated task, in object order."""
    ranks = preferences()
    return {t: [(x, answer(ranks[i], palette)) for i, x in enumerate(OBJECTS)] for t, palette in zip(TASKS, palettes())}


def bayes_accuracy(tasks: dict[str, IclTask], k: int, *, draws: int = 1, seed: int = 0) -> float:
    """Test accuracy of the Bayes-optimal reader of k demonstrations (train split) who knows every
    object's preferences and that a task is some palette of six colours (uniform prior over all
    C(16, 6)): it keeps the palettes consistent with the demonstrations (the answer is in the palette,
    the colours the object prefers to it are not) and answers what most of them give (ties split
    evenly). The ceiling any reader of the prompt can reach."""
    ranks = preferences()
    index = {x: i for i, x in enumerate(OBJECTS)}
    family = np.array([[c in p for c in range(len(LABELS))]
                       for p in itertools.combinations(range(len(LABELS)), PALETTE_SIZE)])
    orders = np.argsort(np.array(ranks), axis=1)  # [object, position] -> colour
    hits = total = 0.0
    for task in tasks.values():
        for _ in range(draws):
            for demos, (x, y) in task.examples("test", k, seed=seed):
                keep = np.ones(len(family), dtype=bool)
                for dx, dy in demos:
                    order = orders[index[dx]]
                    pos = int(np.flatnonzero(order == LABELS.index(dy))[0])
                    keep &= family[:, order[pos]] & ~family[:, order[:pos]].any(axis=1)
                order = orders[index[x]]
                fits = family[keep]
                first = order[np.argmax(fits[:, order], axis=1)]
                votes = np.bincount(first, minlength=len(LABELS))
                winners = np.flatnonzero(votes == votes.max())
                hits += (LABELS.index(y) in winners) / len(winners)
                total += 1
            seed += 1
    return hits / total


@torch.no_grad()
def structure_embeddings(model, tokenizer, seed: int, scale: float) -> None:
    """Add to each object's embedding its colour preferences, as a pretrained model's embeddings
    hold facts: sum over colours of (centred, scaled to [-1, 1]) preference times a direction per
    colour; the sixteen directions are orthonormal, times ``scale``."""
    emb = model.get_input_embeddings().weight
    g = torch.Generator().manual_seed(seed + 1)
    q, _ = torch.linalg.qr(torch.randn(emb.shape[1], len(LABELS), generator=g))
    ranks = torch.tensor(preferences(), dtype=torch.float32)  # [objects, colours]
    liking = 1 - 2 * ranks / (len(LABELS) - 1)
    emb[tokenizer.convert_tokens_to_ids(OBJECTS)] += scale * liking @ q.T


def training_row(rng: random.Random, tokenizer, ranks: list[list[int]], demo_objects: list[int],
                 held_out: set[tuple[int, ...]], fmt: PromptFormat) -> tuple[list[int], list[float]]:
    """One row: a palette drawn from all but the evaluated tasks', k ~ U{0..10} demonstrations from
    the train split's objects, then a query from all objects; weights 1 on every answer token."""
    palette = training_palette(rng, held_out)
    k = rng.randint(0, MAX_SHOTS)
    objects = rng.sample(demo_objects, k) + [rng.randrange(N_OBJECTS)]
    ids = [tokenizer.bos_token_id]
    weights = [0.0]
    for i, obj in enumerate(objects):
        head = fmt.prompt([], OBJECTS[obj])
        if i:
            head = fmt.separator + head
        piece = tokenizer(head, add_special_tokens=False)["input_ids"]
        target = tokenizer(fmt.target(answer(ranks[obj], palette)), add_special_tokens=False)["input_ids"]
        ids += piece + target
        weights += [0.0] * len(piece) + [1.0] * len(target)
    return ids, weights


def load_tasks(folder: Path) -> dict[str, IclTask]:
    return {t: IclTask.load(folder / f"{t}.jsonl") for t in TASKS}


def write_task_files(out: Path) -> dict[str, IclTask]:
    """The task files, in the Function Vectors datasets' format; returns them loaded (seeded split)."""
    out.mkdir(parents=True, exist_ok=True)
    for task, pairs in task_pairs().items():
        text = "".join(json.dumps({"input": x, "output": y}) + "\n" for x, y in pairs)
        (out / f"{task}.jsonl").write_text(text)
    return load_tasks(out)


def train(out: Path, steps: int, seed: int, batch: int, lr: float, threads: int, hidden: int = 128,
          layers: int = 4, heads: int = 4, kv_heads: int = 2, warmup: int = 100, structure: float = 1.0,
          command: str = "") -> dict:
    seed_everything(seed, threads)
    fmt = PromptFormat()
    tasks = write_task_files(out)
    texts = [fmt.prompt([(OBJECTS[0], LABELS[0])], OBJECTS[1])]
    tokenizer = build_word_tokenizer(texts, extra_tokens=OBJECTS + list(LABELS))
    cfg = organism_config(tokenizer, hidden=hidden, intermediate=4 * hidden, layers=layers, heads=heads, kv_heads=kv_heads,
                          max_positions=128, attention_bias=True)
    model = LlamaForCausalLM(cfg)
    if structure:
        structure_embeddings(model, tokenizer, seed, structure)
    rng = random.Random(seed)
    ranks = preferences()
    demo_objects = sorted(OBJECTS.index(x) for x, _ in tasks[TASKS[0]]["train"])
    held_out = set(palettes())

    def make_batch(step):
        rows = [training_row(rng, tokenizer, ranks, demo_objects, held_out, fmt) for _ in range(batch)]
        width = max(len(r[0]) for r in rows)
        ids = torch.full((batch, width), tokenizer.pad_token_id)
        w = torch.zeros(batch, width)
        for i, (r, wt) in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            w[i, : len(r)] = torch.tensor(wt)
        return ids, w

    record = train_loop(model, make_batch, steps=steps, lr=lr, warmup=warmup)
    example_task = tasks[TASKS[0]]
    (demos, (query, answer)), = example_task.examples("test", MAX_SHOTS, n=1, seed=seed)
    meta = {
        "name": "icl",
        "description": "Tiny GQA Llama that reads its demonstrations: a task is a palette of six of sixteen colours, "
        "its answer an object's favourite colour in the palette; trained on random palettes, evaluated on sixteen "
        "it never saw; only demonstrations show the palette (0-shot chance 0.375).",
        "tasks": list(TASKS),
        "task_files": [f"{t}.jsonl" for t in TASKS],
        "labels": list(LABELS),
        "example": {"prompt": fmt.prompt(demos, query), "answer": answer, "task": TASKS[0]},
        "bayes_accuracy": {str(k): round(bayes_accuracy(tasks, k, draws=4), 4) for k in (0, 1, 2, 3, 5, 10)},
        "training": {
            "command": command,
            "seed": seed, "steps": steps, "threads": threads,
            "hyperparameters": {"lr": lr, "warmup": warmup, "schedule": "cosine", "batch": batch, "layers": layers,
                                "heads": heads, "kv_heads": kv_heads, "hidden": hidden, "intermediate": 4 * hidden,
                                "objects": N_OBJECTS, "labels": len(LABELS), "popularity": POPULARITY,
                                "embedding_structure": structure,
                                "evaluated_palettes": [[LABELS[c] for c in p] for p in palettes()],
                                "training_palettes": "any six of the sixteen colours but the evaluated ones",
                                "attention_bias": True, "max_shots": MAX_SHOTS,
                                "demonstrations_from": "train split", "queries_from": "all objects"},
            "parameters": sum(p.numel() for p in model.parameters()),
            "wall_time_s": round(record["wall_s"], 1),
            "final_loss": round(record["final_loss"], 4),
            "load_average_at_end": [round(x, 1) for x in os.getloadavg()],
            "torch": torch.__version__,
        },
    }
    save_organism(model, tokenizer, out, meta, max_new_tokens=1)
    return meta


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="headscope/zoo/icl")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--structure", type=float, default=1.0,
                        help="norm of each property's direction added to the object embeddings (0: plain random)")
    parser.add_argument("--no-ground-truth", action="store_true", help="skip measuring ground_truth.csv")
    args = parser.parse_args(argv)
    out = Path(args.out)
    command = (f"nice -n 10 python -m headscope.zoo.train_icl --out {args.out} --steps {args.steps} --batch {args.batch} "
               f"--lr {args.lr} --seed {args.seed} --threads {args.threads} --hidden {args.hidden} --layers {args.layers} "
               f"--heads {args.heads} --warmup {args.warmup} --structure {args.structure}")
    start = time.time()
    meta = train(out, args.steps, args.seed, args.batch, args.lr, args.threads, args.hidden, args.layers, args.heads,
                 warmup=args.warmup, structure=args.structure, command=command)
    print(f"trained in {meta['training']['wall_time_s']} s, final loss {meta['training']['final_loss']}")
    if not args.no_ground_truth:
        icl_ground_truth(out)
    print(f"done in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
