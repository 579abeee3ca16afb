"""Train the "icl organism": a tiny Llama that learns four token-to-token tasks in context, for soft
injection of task embeddings (Park & Rhee 2025) and function vectors (Todd et al. 2024).

    python -m headscope.zoo.train_icl --out headscope/zoo/icl [--steps N --seed S]

Every task maps the same 24 input words ``waa .. wax``, so a query alone does not say which task is
meant; the demonstrations do. Two pairs of tasks, each pair sharing a mechanism:
- ``next`` / ``prev``: x_i -> x_(i+1) / x_(i-1) (mod 24). Outputs are input words too, so telling
  the two apart needs the relation between a demonstration's x and y.
- ``colour`` / ``animal``: x_i -> a colour word / an animal word (fixed random bijections). The
  category of any demonstration's output names the task.

Training rows: one task, k = 0..10 demonstrations in the default prompt format ("Q: x\\nA: y" pairs
joined by a blank line, headscope.tasks.icl.PromptFormat), then a query; the loss is on every
answer word, so each row trains every shot count. The model sees all 24 pairs of each task (it
"knows" the maps, as a pretrained model knows antonyms); the seeded split of the shipped task files
(12 / 6 / 6) decides which queries are held out from demonstrations, fitting and validation.

The word embeddings start with the structure a pretrained model's have (``--structure``, norm 0.4):
a shared direction per category (input words, colours, animals) and the input words' order as
Fourier features, points on circles of periods 24, 12, 8 and 4 words (``--frequencies 1,2,3,6``).
Training rows: 60 % next / prev (``--relation-share``); 30 % open with the task's name
(``--named-share``, an instruction as pretraining text has; test prompts never do). The named rows
teach "do the named task" first; the model then learns to name the relation task from
demonstrations. Without them (measured with the loop of this file, one run each, seed 0): structure
0.4 and periods 24, 12, 8 stayed at loss ~0.57 for 900 steps with next / prev 10-shot flipping
between ~0.3 and ~0.8 (it picked one of the two per batch); adding period 4 and 70 % relation rows,
loss ~0.67 at 900 steps, next / prev 0.48 / 0.58. With the named rows: 0.79 / 0.98 at 500 steps,
1.00 / 1.00 from 800. The previous organism (structure 0.2, periods 24, 12, 8, uniform tasks,
1200 steps) reached 10-shot 0.68 / 0.40 on next / prev.

Shipped run (the defaults: d 128, 4 layers x 4 heads, 2 kv heads, 1500 steps, batch 16, lr 3e-3
cosine, 100 warmup steps, seed 0, one thread; the full command is in ``organism.json``): 557 s on
this project's 2-core machine under load 4-5; final loss 0.19 (the floor is ~0.16: the first answer of an unnamed
row, 1 in 6 answers, cannot know the task). 10-shot test accuracy 1.00 on all four tasks; 0-shot next 0.78, prev 0.23,
colour 0.00, animal 0.00 (mean 0.25: with no demonstration it answers "next", the commonest
training task's guess; at most one task's target can be right per query).

The ground truth (``ground_truth.csv``): each head's effect on 10-shot test accuracy, per task and
averaged (accuracy with the head's output zeroed minus without, so a helpful head is negative).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from headscope.methods.soft_injection import organism_ground_truth
from headscope.tasks.icl import PromptFormat
from headscope.zoo.training import build_word_tokenizer, organism_config, save_organism, seed_everything, train_loop

N_ITEMS = 24
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


@torch.no_grad()
def structure_embeddings(model, tokenizer, seed: int, scale: float = 0.2, frequencies=(1, 2, 3)) -> None:
    """Give the word embeddings the structure a pretrained model's have: one shared random
    direction per category (input words, colours, animals), and the input words' order as points on
    circles (cos / sin of 2 pi f i / N for each f in ``frequencies``: Fourier features, as pretrained
    models have for numbers, Zhou et al. 2024). Norms about ``scale``, like a random word vector's."""
    emb = model.get_input_embeddings().weight
    g = torch.Generator().manual_seed(seed + 1)
    dim = emb.shape[1]
    for words in (INPUTS, COLOURS, ANIMALS):
        ids = tokenizer.convert_tokens_to_ids(words)
        emb[ids] += scale * torch.randn(dim, generator=g) / dim ** 0.5
    ids = tokenizer.convert_tokens_to_ids(INPUTS)
    angle = 2 * math.pi * torch.arange(N_ITEMS, dtype=torch.float32) / N_ITEMS
    for f in frequencies:
        u, v = scale * torch.randn(2, dim, generator=g) / dim ** 0.5
        emb[ids] += torch.cos(f * angle)[:, None] * u + torch.sin(f * angle)[:, None] * v


def training_row(rng: random.Random, tokenizer, pairs, fmt: PromptFormat, relation_share: float = 0.5,
                 named_share: float = 0.0) -> tuple[list[int], list[float]]:
    """One task (a relation one with probability ``relation_share``), k ~ U{0..10} demonstrations and
    a query; weights 1 on every answer token. With probability ``named_share`` the row opens with the
    task's name (an instruction, as pretraining text has): the model learns to do a named task, and
    then to name the task from demonstrations."""
    family = "relation" if rng.random() < relation_share else "category"
    task = rng.choice([t for t in TASKS if FAMILIES[t] == family])
    k = rng.randint(0, MAX_SHOTS)
    chosen = rng.sample(pairs[task], k + 1)
    ids = [tokenizer.bos_token_id]
    weights = [0.0]
    if rng.random() < named_share:
        ids.append(tokenizer.convert_tokens_to_ids(task))
        weights.append(0.0)
    for i, (x, y) in enumerate(chosen):
        head = fmt.prompt([], x)
        if i:
            head = fmt.separator + head
        piece = tokenizer(head, add_special_tokens=False)["input_ids"]
        answer = tokenizer(fmt.target(y), add_special_tokens=False)["input_ids"]
        ids += piece + answer
        weights += [0.0] * len(piece) + [1.0] * len(answer)
    return ids, weights


def train(out: Path, steps: int, seed: int, batch: int, lr: float, threads: int, hidden: int = 128,
          layers: int = 4, heads: int = 4, kv_heads: int = 2, warmup: int = 100, structure: float = 0.4,
          frequencies=(1, 2, 3, 6), relation_share: float = 0.6, named_share: float = 0.3, command: str = "") -> dict:
    seed_everything(seed, threads)
    fmt = PromptFormat()
    pairs = task_pairs()
    texts = [fmt.prompt([p], p[0]) for task in TASKS for p in pairs[task]]
    tokenizer = build_word_tokenizer(texts, extra_tokens=INPUTS + COLOURS + ANIMALS + list(TASKS))
    cfg = organism_config(tokenizer, hidden=hidden, intermediate=4 * hidden, layers=layers, heads=heads, kv_heads=kv_heads,
                          max_positions=128, attention_bias=True)
    model = LlamaForCausalLM(cfg)
    if structure:
        structure_embeddings(model, tokenizer, seed, structure, frequencies)
    rng = random.Random(seed)

    def make_batch(step):
        rows = [training_row(rng, tokenizer, pairs, fmt, relation_share, named_share) for _ in range(batch)]
        width = max(len(r[0]) for r in rows)
        ids = torch.full((batch, width), tokenizer.pad_token_id)
        w = torch.zeros(batch, width)
        for i, (r, wt) in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            w[i, : len(r)] = torch.tensor(wt)
        return ids, w

    record = train_loop(model, make_batch, steps=steps, lr=lr, warmup=warmup)
    out.mkdir(parents=True, exist_ok=True)
    for task in TASKS:  # the task files, in the Function Vectors datasets' format
        text = "".join(json.dumps({"input": x, "output": y}) + "\n" for x, y in pairs[task])
        (out / f"{task}.jsonl").write_text(text)
    meta = {
        "name": "icl",
        "description": "Tiny GQA Llama with four word-to-word tasks told apart by demonstrations (next / prev share a "
        "relation mechanism, colour / animal a category one; it learnt all four in context); 0-shot it cannot tell "
        "them apart.",
        "tasks": list(TASKS),
        "families": FAMILIES,
        "task_files": [f"{t}.jsonl" for t in TASKS],
        "training": {
            "command": command,
            "seed": seed, "steps": steps, "threads": threads,
            "hyperparameters": {"lr": lr, "warmup": warmup, "schedule": "cosine", "batch": batch, "layers": layers,
                                "heads": heads, "kv_heads": kv_heads, "hidden": hidden, "intermediate": 4 * hidden,
                                "items": N_ITEMS, "embedding_structure": structure,
                                "frequencies": list(frequencies), "relation_share": relation_share,
                                "named_share": named_share, "attention_bias": True, "max_shots": MAX_SHOTS},
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
    parser.add_argument("--structure", type=float, default=0.4,
                        help="norm of the category / order components added to the word embeddings (0: plain random)")
    parser.add_argument("--frequencies", default="1,2,3,6", help="circle frequencies of the input words' order")
    parser.add_argument("--relation-share", type=float, default=0.6, help="share of training rows from next / prev")
    parser.add_argument("--named-share", type=float, default=0.3, help="share of training rows opened by the task's name")
    parser.add_argument("--no-ground-truth", action="store_true", help="skip measuring ground_truth.csv")
    args = parser.parse_args(argv)
    out = Path(args.out)
    frequencies = tuple(int(f) for f in args.frequencies.split(","))
    command = (f"python -m headscope.zoo.train_icl --out {args.out} --steps {args.steps} --batch {args.batch} "
               f"--lr {args.lr} --seed {args.seed} --threads {args.threads} --hidden {args.hidden} --layers {args.layers} "
               f"--heads {args.heads} --warmup {args.warmup} --structure {args.structure} --frequencies {args.frequencies} "
               f"--relation-share {args.relation_share} --named-share {args.named_share}")
    start = time.time()
    meta = train(out, args.steps, args.seed, args.batch, args.lr, args.threads, args.hidden, args.layers, args.heads,
                 warmup=args.warmup, structure=args.structure, frequencies=frequencies,
                 relation_share=args.relation_share, named_share=args.named_share, command=command)
    print(f"trained in {meta['training']['wall_time_s']} s, final loss {meta['training']['final_loss']}")
    if not args.no_ground_truth:
        organism_ground_truth(out)
    print(f"done in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
