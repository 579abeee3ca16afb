"""Retrieval heads (Wu et al. 2024, "Retrieval Head Mechanistically Explains Long-Context
Factuality"; docs/METHODS.md).

A head retrieves when its top-1 attended key lies inside the answer phrase of the needle (the
reference's ``real_needle``) and holds the very token the model emits. Per trial a head scores
hits / len(answer-phrase tokens), so the paper's 0.1 threshold applies; the head score is the mean
over the trials the model answered right (failed trials are dropped, not zero-scored).
``span="needle"`` counts hits in, and divides by, the whole needle sentence instead (smaller scores
by len(answer)/len(needle); headscope's scale before issue 15).

Two variants:
- ``decode`` (the reference): greedy decoding, one query per step (the current token). A trial
  counts when the word-level ROUGE-1 recall of the answer phrase in the decoded text is > 0.5.
  ``decode_steps="answer"`` (default) decodes len(answer) steps; ``"until-stop"`` is the reference's
  rule: decode on (at most ``max_new_tokens`` [50]) up to and including EOS or a newline, counting
  every step. The default is len(answer) because on a trial answered right it scores exactly the
  steps that emit the answer, which the teacher-forced variant can see too (the two then agree, and
  tests check it); steps past the answer add hits only when the model copies answer tokens again.
- ``teacher-forced`` (headscope's): prompt + gold answer in ONE forward pass; the query at p
  predicts token p+1. A trial counts when the model's own greedy prediction is right at every answer
  position, i.e. greedy decoding emits exactly the answer.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import pandas as pd
import plotly.graph_objects as go
import torch
from headscope.progress import tqdm

from headscope.errors import HeadscopeError
from headscope.hf.inputs import pad_id
from headscope.model import HeadModel
from headscope.plots import Figure
from headscope.scores import HeadScores
from headscope.analyzers import registry
from headscope.sharding import Part, Shard, as_part
from headscope.tasks.needle import NeedleTrial, is_correct, rouge1_recall

VARIANTS = ("teacher-forced", "decode")
SPANS = ("answer", "needle")
DECODE_STEPS = ("answer", "until-stop")


def _batches(trials: Sequence[NeedleTrial], batch_size: int) -> list[list[int]]:
    """Indices of trials grouped by prompt length (equal lengths batch without padding)."""
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, trial in enumerate(trials):
        by_length[len(trial.prompt_ids)].append(i)
    return [idx[s : s + batch_size] for idx in by_length.values() for s in range(0, len(idx), batch_size)]


def _stop_ids(hm: HeadModel) -> set[int]:
    """EOS ids and the newline token: where the reference stops decoding."""
    stops: set[int] = set()
    for source in (hm.tokenizer, getattr(hm.model, "generation_config", None)):
        eos = getattr(source, "eos_token_id", None)
        stops.update([eos] if isinstance(eos, int) else eos or [])
    newline = hm.tokenizer("\n", add_special_tokens=False)["input_ids"]
    if newline and hm.tokenizer.decode(newline[-1:]) == "\n":
        stops.add(int(newline[-1]))
    return stops


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


def scored_span(trial: NeedleTrial, span: str) -> tuple[int, int]:
    """The [start, stop) prompt positions where hits count and whose length divides them."""
    if span == "needle":
        return trial.needle_span
    if trial.answer_span is None:
        raise HeadscopeError(
            "this trial does not mark its answer span (NeedleTrial.answer_span); build trials with NeedleTask "
            'or ContextConflictTask, or score with span="needle"'
        )
    return trial.answer_span


def answer_text(tokenizer, trial: NeedleTrial) -> str:
    """The answer phrase as the needle has it (the reference's ``real_needle``), rendered by the
    tokenizer: the text the decode variant's ROUGE-1 filter looks for."""
    if trial.answer_span is None:
        return trial.answer
    start, stop = trial.answer_span
    return tokenizer.decode(trial.prompt_ids[start:stop], skip_special_tokens=True)


def answered(tokenizer, generated_ids: Sequence[int], trial: NeedleTrial) -> bool:
    """The decode variant's trial filter (reference): word-level ROUGE-1 recall of the answer phrase
    in the decoded text > 0.5. Text, not token ids: a wrong number sharing digit pieces fails."""
    text = tokenizer.decode(list(generated_ids), skip_special_tokens=True)
    return rouge1_recall(text, answer_text(tokenizer, trial)) > 0.5


def _per_head(hits: torch.Tensor, row: int, steps: int, span: tuple[int, int]) -> torch.Tensor:
    return (hits[:, row, :, :steps].sum(-1).float() / (span[1] - span[0])).cpu()


@torch.no_grad()
def _score_teacher_forced(hm: HeadModel, trials, idx, pad, span, **_):
    batch = [trials[i] for i in idx]
    spans = [scored_span(t, span) for t in batch]
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
    hits = _hits(top1, seq, spans, targets)
    predicted = logits[:, rows[0] : rows[1]].argmax(-1)
    results = []
    for row, t in enumerate(batch):
        a = len(t.answer_ids)
        exact = bool((predicted[row, :a] == targets[row, :a]).all())  # greedy decoding emits the answer
        results.append((_per_head(hits, row, a, spans[row]), exact))
    return results


@torch.no_grad()
def _score_decode(hm: HeadModel, trials, idx, pad, span, decode_steps="answer", max_new_tokens=50):
    batch = [trials[i] for i in idx]
    spans = [scored_span(t, span) for t in batch]
    until_stop = decode_steps == "until-stop"
    steps = max_new_tokens if until_stop else max(len(t.answer_ids) for t in batch)
    stops = torch.tensor(sorted(_stop_ids(hm)) if until_stop else [], dtype=torch.long, device=hm.device)
    seq = torch.tensor([t.prompt_ids for t in batch], device=hm.device)
    out = hm.model(seq[:, :-1], use_cache=True)
    cache = out.cache
    current = seq[:, -1:]
    step_hits, generated = [], []
    n_steps = torch.tensor([len(t.answer_ids) for t in batch], device=hm.device)
    stopped = torch.zeros(len(batch), dtype=torch.bool, device=hm.device)
    with hm.attention_stats(["top1"]) as rec:
        for step in range(steps):
            out = hm.model(current, cache=cache, use_cache=True)
            cache = out.cache
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            top1 = rec.top1_index().to(seq.device)  # [L, b, H, 1]
            seq = torch.cat([seq, nxt], dim=1)
            step_hits.append(_hits(top1, seq, spans, nxt))
            generated.append(nxt)
            current = nxt
            if until_stop:  # a row's steps run up to and including its first stop token
                n_steps = torch.where(stopped, n_steps, torch.full_like(n_steps, step + 1))
                stopped |= torch.isin(nxt[:, 0], stops)
                if bool(stopped.all()):
                    break
    hits = torch.cat(step_hits, dim=-1)  # [L, b, H, steps]
    gen = torch.cat(generated, dim=1)
    results = []
    for row, t in enumerate(batch):
        n = int(n_steps[row])
        results.append((_per_head(hits, row, n, spans[row]), answered(hm.tokenizer, gen[row, :n].tolist(), t)))
    return results


def retrieval_heads(
    hm: HeadModel,
    trials: Sequence[NeedleTrial],
    variant: str = "teacher-forced",
    span: str = "answer",
    decode_steps: str = "answer",
    max_new_tokens: int = 50,
    batch_size: int = 8,
    progress: bool = True,
    shard: Shard | None = None,
) -> HeadScores:
    """Score every head's retrieval behaviour over needle trials (Wu et al. 2024).

    ``span``: "answer" (reference: the answer phrase inside the needle) or "needle" (the whole
    needle sentence). ``decode_steps`` (decode variant): "answer" (default, len(answer) steps) or
    "until-stop" (reference: up to EOS/newline, at most ``max_new_tokens``). See the module notes.
    ``shard``: run only that shard's block of trial batches (a part for ``headscope merge``).
    """
    if variant not in VARIANTS:
        raise HeadscopeError(f"unknown retrieval variant {variant!r}; choose one of {VARIANTS}")
    if span not in SPANS:
        raise HeadscopeError(f"unknown retrieval span {span!r}; choose one of {SPANS}")
    if decode_steps not in DECODE_STEPS:
        raise HeadscopeError(f"unknown decode_steps {decode_steps!r}; choose one of {DECODE_STEPS}")
    if decode_steps != "answer" and variant != "decode":
        raise HeadscopeError('decode_steps="until-stop" needs variant="decode" (teacher forcing scores the answer only)')
    if max_new_tokens < 1:
        raise HeadscopeError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
    if not trials:
        raise HeadscopeError("no needle trials to score; give at least one length, depth and needle")
    if not hm.geometry.causal:
        raise HeadscopeError("retrieval heads need a causal language model (generation); this model is an encoder")
    if variant == "decode" and hm.tokenizer is None:
        raise HeadscopeError("the decode variant needs the model's tokenizer (its trial filter compares texts)")
    score_batch = _score_teacher_forced if variant == "teacher-forced" else _score_decode
    pad = pad_id(hm.tokenizer)
    plan = _batches(trials, batch_size)
    runs = []  # (batch number, trial, [layers, heads] or None where the model answered wrong), in run order
    for k, idx in enumerate(tqdm(plan, desc=f"retrieval ({variant})", disable=not progress)):
        if shard is None or shard.owns(k, len(plan)):
            results = score_batch(hm, trials, idx, pad, span, decode_steps=decode_steps, max_new_tokens=max_new_tokens)
            runs += [(k, i, per_head if ok else None) for i, (per_head, ok) in zip(idx, results)]
    params = {"variant": variant, "span": span, "trials": len(trials)}
    if variant == "decode":
        params["decode_steps"] = decode_steps
    if shard is not None:
        scores = HeadScores(torch.full((hm.geometry.n_layers, hm.geometry.n_heads), float("nan")), "retrieval", hm.name, params)
        return as_part(scores, shard, runs=runs)
    return retrieval_result([(i, value) for _, i, value in runs], hm.name, params)


def retrieval_result(runs, model: str, params: dict) -> HeadScores:
    """Mean per-head score over the correctly answered trials, summed in run order (also what
    ``headscope merge`` calls). ``runs``: (trial index, [layers, heads] or None) in run order."""
    total, counted = None, 0
    per_trial: list[torch.Tensor | None] = [None] * params["trials"]
    for i, per_head in runs:
        if per_head is not None:
            total = per_head.clone() if total is None else total + per_head
            counted += 1
            per_trial[i] = per_head
    if counted == 0:
        raise HeadscopeError(
            f"the model answered none of the {params['trials']} needle trials correctly, so retrieval scores are "
            "undefined (failed trials are dropped, as in Wu et al. 2024). Check what it answers with `headscope eval "
            "--task needle` or `headscope generate`; try shorter --lengths, the prompt format it was trained on "
            "(--chat-template on|off, --needles), or a stronger model."
        )
    scores = HeadScores(total / counted, method="retrieval", model=model, params={**params, "counted_trials": counted})
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
    pad = pad_id(hm.tokenizer)
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


def join_trials(parts: Sequence[Part]) -> HeadScores:
    """``headscope merge`` of needle-grid parts: every part's trial runs back in the unsharded run's
    order, summed as it sums them (:func:`retrieval_result`)."""
    runs = sorted((batch, k, trial, value) for part in parts for k, (batch, trial, value) in enumerate(part.extra["runs"]))
    if sorted(trial for _, _, trial, _ in runs) != list(range(parts[0].params["trials"])):
        raise HeadscopeError(f"the parts' trials do not make up the {parts[0].params['trials']} trials of one run once "
                             "each (parts of runs with another batch size or grid); re-run them with one command "
                             "(only --shard I/N differs)")
    return retrieval_result([(trial, value) for _, _, trial, value in runs], parts[0].model, parts[0].params)


registry.register(registry.Analyzer("retrieval", retrieval_heads, join=join_trials,
                                    doc="retrieval heads (Wu et al. 2024)"))
