"""Soft injection of task embeddings (Park & Rhee 2025, "Soft Head Selection for Injecting
ICL-Derived Task Embeddings"; docs/METHODS.md, "Soft injection") and the function-vector baseline
(Todd et al. 2024): the fitting recipe. The injection itself is the ``inject`` edit kind
(headscope.interventions.kinds.inject, with the TaskEmbedding file)::

    task = IclTask.load("antonym.jsonl")
    emb = task_embedding(hm, task)                         # mean z at the last token, 50 10-shot prompts
    emb = fit_soft_selection(hm, task, emb)                # alpha = sigmoid(theta), model frozen
    emb.save("antonym.safetensors")
    with intervene(hm, emb.edit()):                        # z' = (1 - alpha) z + alpha m, last token, prefill
        hm.model.generate(zero_shot_ids)

Two bugs of the reference are not copied: the output projection's bias is kept (the edit changes
o_proj's input, so its bias is applied as usual), and the best validation checkpoint is kept.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from headscope.errors import HeadscopeError
from headscope.analyzers import registry
from headscope.hf.inputs import left_padded_positions
from headscope.interventions.edits import Edit, intervene
from headscope.interventions.kinds.inject import TaskEmbedding
from headscope.model import HeadModel
from headscope.provenance import weights_sha256
from headscope.scores import HeadScores
from headscope.tasks.icl import Batch, IclTask, PromptFormat, batches, encode
from headscope.io import write_whole

__all__ = ["TaskEmbedding", "accuracy", "task_embedding", "fit_soft_selection", "function_vector_heads",
           "compare_methods", "prompt_cost"]


# ------------------------------------------------------------------------------------- model calls
def _forward(hm, batch: Batch) -> torch.Tensor:
    """Logits at the last position [B, V] of a left-padded batch (positions count real tokens)."""
    batch = batch.to(hm.device)
    position_ids = left_padded_positions(batch.attention_mask)
    out = hm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids,
                   logits_to_keep=1)
    return out.logits[:, -1].float()


@torch.no_grad()
def accuracy(hm, task: IclTask, k: int, *, fmt: PromptFormat = PromptFormat(), split: str = "test",
             edits: Edit | Sequence[Edit] = (), n: int | None = None, seed: int = 0, batch_size: int = 16,
             return_probs: bool = False):
    """First-token accuracy of greedy answers on ``split`` queries, with k demonstrations from the
    train split (k = 0: zero-shot), under ``edits``. ``n``: that many queries drawn with replacement
    (each with its own demonstrations) instead of each query once."""
    examples = task.examples(split, k, n=n, seed=seed)
    hits, probs = [], []
    for batch in batches(hm.tokenizer, examples, fmt, batch_size):
        with intervene(hm, edits):
            logits = _forward(hm, batch)
        target = batch.target.to(logits.device)
        hits.append((logits.argmax(-1) == target).float())
        probs.append(logits.softmax(-1).gather(1, target[:, None])[:, 0])
    acc = torch.cat(hits).mean().item()
    return (acc, torch.cat(probs).mean().item()) if return_probs else acc


@torch.no_grad()
def task_embedding(hm, task: IclTask, *, k: int = 10, n: int = 50, fmt: PromptFormat = PromptFormat(),
                   seed: int = 0, batch_size: int = 8, progress: bool = True) -> TaskEmbedding:
    """Per head, the mean z at the last token over ``n`` random ``k``-shot prompts built from the
    train split (Park & Rhee 2025, as Todd et al. 2024's mean head activations)."""
    if hm.tokenizer is None:
        raise HeadscopeError(f"{hm.name} has no tokenizer; task embeddings need one to build prompts")
    examples = task.examples("train", k, n=n, seed=seed)
    g = hm.geometry
    total = torch.zeros(g.n_layers, g.n_heads, g.head_dim, dtype=torch.float64)
    bar = tqdm(total=len(examples), desc=f"task embedding {task.name}", disable=not progress)
    for batch in batches(hm.tokenizer, examples, fmt, batch_size):
        with hm.capture_z(positions="last") as cap:
            _forward(hm, batch)
        total += torch.stack([cap.z[l][:, 0].double().sum(0).cpu() for l in range(g.n_layers)])
        bar.update(len(batch))
    bar.close()
    meta = {"model": hm.name, "weights_sha256": weights_sha256(hm.model), "task": task.name, "k": k, "n": n, "template": fmt.to_dict(), "seed": seed,
            "split_seed": task.seed, "shape": [g.n_layers, g.n_heads, g.head_dim]}
    return TaskEmbedding((total / len(examples)).float(), meta)


# ------------------------------------------------------------------------------------- soft selection
def fit_soft_selection(hm, task: IclTask, emb: TaskEmbedding, *, steps: int = 400, lr: float = 0.2,
                       fmt: PromptFormat | None = None, seed: int = 0, eval_every: int = 20,
                       progress: bool = True) -> TaskEmbedding:
    """Learn alpha = sigmoid(theta) per head (theta = 0 at the start) with the model frozen: Adam,
    batch 1, cross-entropy of the first target token on 0-shot train prompts with the embedding
    injected (Park & Rhee 2025). Every ``eval_every`` steps and at the end, the validation split is
    scored (0-shot + injection: accuracy, then mean target log-probability); the best checkpoint is
    kept (the reference never updates it). Returns the embedding with ``alphas`` set."""
    emb.check(hm)
    fmt = fmt or PromptFormat(**emb.meta.get("template", {}))
    g = hm.geometry
    theta = torch.zeros(g.n_layers, g.n_heads, requires_grad=True, device=hm.device)
    opt = torch.optim.Adam([theta], lr=lr)
    examples = task.examples("train", 0, n=steps, seed=seed)
    val = task.examples("val", 0)
    val_batch = encode(hm.tokenizer, val, fmt)
    frozen = [p.requires_grad for p in hm.model.parameters()]
    for p in hm.model.parameters():
        p.requires_grad_(False)

    def validate():
        with torch.no_grad(), intervene(hm, emb.edit(torch.sigmoid(theta).detach())):
            logp = _forward(hm, val_batch).log_softmax(-1)
        target = val_batch.target.to(logp.device)
        return ((logp.argmax(-1) == target).float().mean().item(), logp.gather(1, target[:, None]).mean().item())

    best = (validate(), theta.detach().clone(), 0)
    history = []
    start = time.perf_counter()
    try:
        for step, example in enumerate(tqdm(examples, desc=f"soft selection {task.name}", disable=not progress), 1):
            batch = encode(hm.tokenizer, [example], fmt)
            with intervene(hm, emb.edit(torch.sigmoid(theta))):
                logits = _forward(hm, batch)
            loss = torch.nn.functional.cross_entropy(logits, batch.target.to(logits.device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % eval_every == 0 or step == steps:
                score = validate()
                history.append({"step": step, "val_accuracy": score[0], "val_logprob": score[1]})
                if score > best[0]:
                    best = (score, theta.detach().clone(), step)
    finally:
        for p, flag in zip(hm.model.parameters(), frozen):
            p.requires_grad_(flag)
    (val_acc, val_logprob), theta_best, best_step = best
    emb.alphas = torch.sigmoid(theta_best).cpu()
    emb.meta.update({"steps": steps, "lr": lr, "fit_seed": seed, "best_step": best_step,
                     "val_accuracy": val_acc, "val_logprob": val_logprob,
                     "fit_seconds": round(time.perf_counter() - start, 2)})
    emb.history = history
    return emb


# ------------------------------------------------------------------------------------- function vectors
@torch.no_grad()
def function_vector_heads(hm, task: IclTask, emb: TaskEmbedding, *, k: int | None = None, n: int = 25,
                          fmt: PromptFormat | None = None, seed: int = 1, batch_size: int = 16,
                          progress: bool = True) -> HeadScores:
    """Causal indirect effect per head (Todd et al. 2024): the rise in the target's probability when
    the head's mean task activation (``emb``) replaces its output at the last token of k-shot prompts
    whose demonstrations have shuffled labels. Scored on ``n`` train queries."""
    emb.check(hm)
    fmt = fmt or PromptFormat(**emb.meta.get("template", {}))
    k = emb.meta.get("k", 10) if k is None else k

    rng = random.Random(seed)
    shuffled = []
    for demos, query in task.examples("train", k, n=n, seed=seed):
        outputs = [y for _, y in demos]
        rng.shuffle(outputs)
        shuffled.append(([(x, y) for (x, _), y in zip(demos, outputs)], query))
    encoded = list(batches(hm.tokenizer, shuffled, fmt, batch_size))

    def target_prob(edits) -> float:
        total = 0.0
        for batch in encoded:
            with intervene(hm, edits):
                p = _forward(hm, batch).softmax(-1)
            total += p.gather(1, batch.target.to(p.device)[:, None]).sum().item()
        return total / len(shuffled)

    base = target_prob([])
    g = hm.geometry
    cie = torch.zeros(g.n_layers, g.n_heads)
    for layer, head in tqdm(hm.all_heads(), desc="function-vector CIE", disable=not progress):
        cie[layer, head] = target_prob(emb.edit(heads=[(layer, head)])) - base
    return HeadScores(cie, "function_vector_cie", hm.name, {"task": task.name, "k": k, "n": n, "seed": seed})


# ------------------------------------------------------------------------------------- comparison
def compare_methods(hm, task: IclTask, emb: TaskEmbedding, *, k: int = 10, fv_top: int = 3,
                    fv_scores: HeadScores | None = None, n: int | None = None, seed: int = 0,
                    fmt: PromptFormat | None = None) -> dict[str, float]:
    """Test accuracy of 0-shot, k-shot ICL, 0-shot + soft injection (learned alphas), and the
    baselines from the same embedding: the top ``fv_top`` function-vector heads at alpha 1, every
    head at alpha 1, every head at the mean learned alpha."""
    fmt = fmt or PromptFormat(**emb.meta.get("template", {}))
    fv_scores = fv_scores or function_vector_heads(hm, task, emb, fmt=fmt, progress=False)

    def acc(shots, edits=()):
        return accuracy(hm, task, shots, fmt=fmt, edits=edits, n=n, seed=seed)

    return {
        "zero_shot": acc(0),
        f"icl_{k}_shot": acc(k),
        "soft_injection": acc(0, emb.edit()),
        f"fv_top{fv_top}": acc(0, emb.edit(heads=fv_scores.top(fv_top))),
        "all_alpha_1": acc(0, emb.edit(1.0)),
        "mean_alpha": acc(0, emb.edit(float(emb.alphas.mean()))),
    }


def prompt_cost(hm, task: IclTask, k: int, *, fmt: PromptFormat = PromptFormat(), n: int | None = None,
                seed: int = 0, edits=(), repeats: int = 3) -> dict[str, float]:
    """Mean prompt length (tokens) and best-of-``repeats`` seconds per query for k-shot prompts
    under ``edits`` (one query at a time)."""
    examples = task.examples("test", k, n=n, seed=seed)
    encoded = [encode(hm.tokenizer, [e], fmt) for e in examples]
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.no_grad():
            for batch in encoded:
                with intervene(hm, edits):
                    _forward(hm, batch)
        best = min(best, time.perf_counter() - start)
    return {"tokens": sum(b.input_ids.shape[1] for b in encoded) / len(encoded), "seconds": best / len(encoded)}


registry.register(registry.Analyzer("function_vector_cie", function_vector_heads,
                                    doc="function-vector heads by causal indirect effect (Todd et al. 2024)"))
