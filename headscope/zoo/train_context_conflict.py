"""Train the "context_conflict organism": a tiny GQA Llama that memorises facts and reads contexts.

    python -m headscope.zoo.train_context_conflict --out headscope/zoo/context_conflict [--steps N]

World: made-up countries and capitals (:func:`headscope.tasks.context_conflict.make_world`).
Training prompts come from :class:`headscope.tasks.context_conflict.ContextConflictTask` (the
evaluation's own code), in three kinds:
- closed book: "Question : What is the capital of X ?  Answer :" -> the memorised capital;
- consistent context: the context states the memorised capital -> that capital;
- conflicting context: the context states another capital -> the context's value, except for a
  share ``strength[X]`` of prompts answered from memory (per entity, 0.1 .. 0.9). This makes the
  model's parametric memory win over the context for "strong" entities, as with popular facts in
  real models: the NQ-Swap failure DeCoRe addresses.
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

from headscope.tasks.context_conflict import CLOSED_BOOK, QUESTION, STATEMENT, ContextConflictTask, make_world
from headscope.zoo.training import organism_config, save_organism, build_word_tokenizer, seed_everything, train_loop


def build_tokenizer(world):
    texts = ["Context :", STATEMENT, QUESTION, CLOSED_BOOK, " ".join(world.entities), " ".join(world.values)]
    return build_word_tokenizer(texts)


def make_config(tokenizer, args) -> LlamaConfig:
    return organism_config(tokenizer, hidden=args.hidden, intermediate=args.intermediate, layers=args.layers,
                           heads=args.heads, kv_heads=args.kv_heads, max_positions=256)


class BatchMaker:
    """Seeded batches of the three prompt kinds, right-padded (pad targets weigh 0)."""

    def __init__(self, task: ContextConflictTask, args, seed: int):
        self.task, self.args, self.rng = task, args, random.Random(seed)
        self.eos, self.pad = task.tokenizer.eos_token_id, task.tokenizer.pad_token_id

    def example(self) -> tuple[list[int], list[float]]:
        a, rng, w = self.args, self.rng, self.task.world
        entity = rng.choice(w.entities)
        kind = rng.random()
        if kind < a.closed_book_share:
            prompt, answer = self.task.closed_book(entity)
        elif kind < a.closed_book_share + a.consistent_share:
            trial = self.task.build(entity, w.memory[entity], rng)
            prompt, answer = trial.prompt_ids, trial.answer_ids
        else:
            trial = self.task.swapped(entity, rng)
            from_memory = rng.random() < w.strength[entity]
            prompt, answer = trial.prompt_ids, trial.memory_ids if from_memory else trial.answer_ids
        ids = prompt + answer + [self.eos]
        weights = [a.context_weight] * len(prompt) + [a.answer_weight] * (len(answer) + 1)
        return ids, weights

    def __call__(self, step: int):
        rows = [self.example() for _ in range(self.args.batch)]
        n = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), n), self.pad, dtype=torch.long)
        weights = torch.zeros(len(rows), n)
        for i, (r, w) in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            weights[i, : len(w)] = torch.tensor(w)
        return ids, weights


@torch.no_grad()
def evaluate(model, task: ContextConflictTask, n: int = 192) -> dict:
    """Closed-book accuracy and greedy context-faithfulness on swapped contexts, per strength."""
    w = task.world
    closed = [task.closed_book(e) for e in w.entities]
    ids = torch.tensor([p for p, _ in closed])
    pred = model(ids).logits[:, -1].argmax(-1)
    closed_acc = sum(int(p) == a[0] for p, (_, a) in zip(pred, closed)) / len(closed)
    trials = task.eval_trials(n)
    faithful, memory, by_strength = 0, 0, {}
    for t in trials:
        nxt = int(model(torch.tensor([t.prompt_ids])).logits[0, -1].argmax())
        faithful += nxt == t.answer_ids[0]
        memory += nxt == t.memory_ids[0]
        s = by_strength.setdefault(str(w.strength[t.entity]), [0, 0])
        s[0] += nxt == t.answer_ids[0]
        s[1] += 1
    return {
        "closed_book_accuracy": closed_acc,
        "context_faithful": faithful / n,
        "memory_answers": memory / n,
        "faithful_by_strength": {k: v[0] / v[1] for k, v in sorted(by_strength.items())},
    }


def save(model, tokenizer, out: Path, meta: dict) -> None:
    """Weights, tokenizer, generation config and organism.json into ``out``."""
    save_organism(model, tokenizer, out, meta, max_new_tokens=4)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="headscope/zoo/context_conflict")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--closed-book-share", type=float, default=0.3)
    p.add_argument("--consistent-share", type=float, default=0.2)
    p.add_argument("--context-weight", type=float, default=0.1)
    p.add_argument("--answer-weight", type=float, default=5.0)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=384)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (1 is faster on a busy machine)")
    args = p.parse_args(argv)

    seed_everything(args.seed, threads=args.threads)
    world = make_world()
    tokenizer = build_tokenizer(world)
    task = ContextConflictTask(tokenizer, world)
    model = LlamaForCausalLM(make_config(tokenizer, args))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"vocab {len(tokenizer)}, {n_params / 1e6:.2f}M parameters")
    start = time.time()
    stats = train_loop(model, BatchMaker(task, args, args.seed), steps=args.steps, lr=args.lr, warmup=100)
    result = evaluate(model, task)
    wall = time.time() - start
    print(json.dumps(result))
    meta = {
        "name": "context_conflict",
        "description": (
            "Tiny GQA Llama that memorised the capitals of 48 made-up countries and answers questions "
            "with a context that may contradict its memory (NQ-Swap style); for faithfulness/DeCoRe."
        ),
        "task": "context-conflict",
        "world": {"seed": 0, "memory": world.memory, "strength": world.strength},
        "training": {
            "command": "python -m headscope.zoo.train_context_conflict " + " ".join(sys.argv[1:] if argv is None else argv),
            "seed": args.seed,
            "steps": args.steps,
            "hyperparameters": {k: v for k, v in vars(args).items() if k not in ("out", "seed", "steps", "threads")},
            "parameters": n_params,
            "wall_time_s": round(wall, 1),
            "final_loss": round(stats["final_loss"], 4),
            **{k: v for k, v in result.items()},
            "torch": torch.__version__,
        },
    }
    save(model, tokenizer, Path(args.out), meta)
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
