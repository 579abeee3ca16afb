"""Retrieval heads (Wu et al. 2024, "Retrieval Head Mechanistically Explains Long-Context
Factuality").

A head retrieves when its top-1 attended key lies inside the needle and holds the very token the
model emits. Per trial a head scores hits / len(needle tokens); the head score is the mean over the
trials the model answered right (failed trials are dropped, not zero-scored).

Two variants:
- ``decode`` (the reference): greedy decoding, one query per step (the current token).
- ``teacher-forced`` (headscope's): prompt + gold answer in ONE forward pass; the query at p
  predicts token p+1. A trial counts when the model's own greedy prediction is right on more than
  half of the answer tokens. On trials the model answers right both variants see the same inputs,
  so they give the same hits.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import pandas as pd
import torch
from headscope.progress import tqdm

from headscope.errors import HeadscopeError
from headscope.model import HeadModel
from headscope.scores import HeadScores
from headscope.tasks.needle import NeedleTrial, is_correct, rouge1_recall

VARIANTS = ("teacher-forced", "decode")


def _batches(trials: Sequence[NeedleTrial], batch_size: int) -> list[list[int]]:
    """Indices of trials grouped by prompt length (equal lengths batch without padding)."""
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, trial in enumerate(trials):
        by_length[len(trial.prompt_ids)].append(i)
    return [idx[s : s + batch_size] for idx in by_length.values() for s in range(0, len(idx), batch_size)]


def _pad_id(hm: HeadModel) -> int:
    tok = hm.tokenizer
    for candidate in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None)):
        if candidate is not None:
            return int(candidate)
    return 0


def _hits(top1: torch.Tensor, seq: torch.Tensor, spans, targets: torch.Tensor) -> torch.Tensor:
    """Retrieval hits per (layer, trial, head, step).

    top1 [L, b, H, T] key index; seq [b, N] token ids; spans [(start, stop)] per trial;
    targets [b, T] the token produced (or to be produced) at each step.
    """
    b = seq.shape[0]
    key = top1.clamp(min=0)
    token_at_key = torch.gather(seq.unsqueeze(0).unsqueeze(2).expand(top1.shape[0], b, top1.shape[2], -1), 3, key)
    start = torch.tensor([s for s, _ in spans], device=top1.device).view(1, b, 1, 1)
    stop = torch.tensor([e for _, e in spans], device=top1.device).view(1, b, 1, 1)
    inside = (top1 >= start) & (top1 < stop)
    return inside & (token_at_key == targets.view(1, b, 1, -1))


@torch.no_grad()
def _score_teacher_forced(hm: HeadModel, trials, idx, pad):
    batch = [trials[i] for i in idx]
    n_prompt = len(batch[0].prompt_ids)
    n_answer = max(len(t.answer_ids) for t in batch)
    seq = torch.full((len(batch), n_prompt + n_answer), pad, dtype=torch.long)
    for row, t in enumerate(batch):
        seq[row, :n_prompt] = torch.tensor(t.prompt_ids)
        seq[row, n_prompt : n_prompt + len(t.answer_ids)] = torch.tensor(t.answer_ids)
    seq = seq.to(hm.device)
    rows = (n_prompt - 1, n_prompt - 1 + n_answer)
    with hm.attention_stats(["top1"], query_rows=rows) as rec:
        logits = hm.model(seq).logits
    top1 = rec.top1_index().to(seq.device)  # [L, b, H, n_answer]
    targets = seq[:, n_prompt : n_prompt + n_answer]
    hits = _hits(top1, seq, [t.needle_span for t in batch], targets)
    predicted = logits[:, rows[0] : rows[1]].argmax(-1)
    results = []
    for row, t in enumerate(batch):
        a = len(t.answer_ids)
        right = (predicted[row, :a] == targets[row, :a]).float().mean().item()
        per_head = hits[:, row, :, :a].sum(-1).float() / (t.needle_span[1] - t.needle_span[0])
        results.append((per_head.cpu(), right > 0.5))
    return results


@torch.no_grad()
def _score_decode(hm: HeadModel, trials, idx, pad):
    batch = [trials[i] for i in idx]
    n_prompt = len(batch[0].prompt_ids)
    steps = max(len(t.answer_ids) for t in batch)
    seq = torch.tensor([t.prompt_ids for t in batch], device=hm.device)
    out = hm.model(seq[:, :-1], use_cache=True)
    cache = out.past_key_values
    current = seq[:, -1:]
    step_hits = []
    generated = []
    with hm.attention_stats(["top1"]) as rec:
        for step in range(steps):
            out = hm.model(current, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            top1 = rec.top1_index().to(seq.device)  # [L, b, H, 1]
            seq = torch.cat([seq, nxt], dim=1)
            step_hits.append(_hits(top1, seq, [t.needle_span for t in batch], nxt))
            generated.append(nxt)
            current = nxt
    hits = torch.cat(step_hits, dim=-1)  # [L, b, H, steps]
    gen = torch.cat(generated, dim=1)
    results = []
    for row, t in enumerate(batch):
        a = len(t.answer_ids)
        recall = rouge1_recall(gen[row, :a].tolist(), t.answer_ids)
        per_head = hits[:, row, :, :a].sum(-1).float() / (t.needle_span[1] - t.needle_span[0])
        results.append((per_head.cpu(), recall > 0.5))
    return results


def retrieval_heads(
    hm: HeadModel,
    trials: Sequence[NeedleTrial],
    variant: str = "teacher-forced",
    batch_size: int = 8,
    progress: bool = True,
) -> HeadScores:
    """Score every head's retrieval behaviour over needle trials (Wu et al. 2024)."""
    if variant not in VARIANTS:
        raise HeadscopeError(f"unknown retrieval variant {variant!r}; choose one of {VARIANTS}")
    if not trials:
        raise HeadscopeError("no needle trials to score; give at least one length, depth and needle")
    if not hm.geometry.causal:
        raise HeadscopeError("retrieval heads need a causal language model (generation); this model is an encoder")
    score_batch = _score_teacher_forced if variant == "teacher-forced" else _score_decode
    pad = _pad_id(hm)
    total = torch.zeros(hm.geometry.n_layers, hm.geometry.n_heads)
    per_trial: list[torch.Tensor | None] = [None] * len(trials)
    counted = 0
    for idx in tqdm(_batches(trials, batch_size), desc=f"retrieval ({variant})", disable=not progress):
        for i, (per_head, ok) in zip(idx, score_batch(hm, trials, idx, pad)):
            if ok:
                total += per_head
                counted += 1
                per_trial[i] = per_head
    if counted == 0:
        raise HeadscopeError(
            f"the model answered none of the {len(trials)} needle trials correctly, so retrieval scores are "
            "undefined (failed trials are dropped, as in Wu et al. 2024). Check what it answers with `headscope eval "
            "--task needle` or `headscope generate`; try shorter --lengths, the prompt format it was trained on "
            "(--chat-template on|off, --needles), or a stronger model."
        )
    scores = HeadScores(
        total / counted,
        method="retrieval",
        model=hm.name,
        params={"variant": variant, "trials": len(trials), "counted_trials": counted},
    )
    scores.per_trial = per_trial  # [layers, heads] per trial, None where the trial was dropped
    return scores


@torch.no_grad()
def needle_accuracy(
    hm: HeadModel,
    trials: Sequence[NeedleTrial],
    max_new_tokens: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> pd.DataFrame:
    """Greedy-decode every trial; one row per trial: length, depth, needle, correct, output."""
    if hm.tokenizer is None:
        raise HeadscopeError("needle accuracy needs the model's tokenizer to decode answers")
    pad = _pad_id(hm)
    rows = []
    for idx in tqdm(_batches(trials, batch_size), desc="needle accuracy", disable=not progress):
        batch = [trials[i] for i in idx]
        ids = torch.tensor([t.prompt_ids for t in batch], device=hm.device)
        budget = max_new_tokens or max(len(t.answer_ids) for t in batch) + 4
        out = hm.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=budget,
            do_sample=False,
            pad_token_id=pad,
        )
        for t, gen in zip(batch, out[:, ids.shape[1] :]):
            text = hm.tokenizer.decode(gen, skip_special_tokens=True)
            rows.append(
                {
                    "length": t.length,
                    "depth": t.depth,
                    "needle": t.needle_index,
                    "correct": is_correct(text, t.answer),
                    "output": text,
                }
            )
    return pd.DataFrame(rows)


def accuracy_heatmap(records: pd.DataFrame, title: str = "Needle-in-a-haystack accuracy"):
    """Plotly heatmap of accuracy, context length (x) by needle depth (y)."""
    import plotly.graph_objects as go

    from headscope.plots import Figure

    pivot = records.pivot_table(index="depth", columns="length", values="correct", aggfunc="mean")
    fig = Figure(
        go.Heatmap(
            z=pivot.values,
            x=[str(c) for c in pivot.columns],
            y=[f"{d:g}%" for d in pivot.index],
            zmin=0,
            zmax=1,
            colorscale="RdYlGn",
            colorbar={"title": "accuracy"},
        )
    )
    fig.update_layout(title=title, xaxis_title="context length (tokens)", yaxis_title="needle depth")
    return fig
