"""Safety heads: Ships and Sahara (Zhou et al. 2024, "On the Role of Attention Heads in LLM Safety").

- :func:`ships`: per harmful query, KL(p_base || p_ablated) of the next-token distribution at the
  last position with one head ablated; heads ranked over a dataset by how many queries have them
  in their top 10, ties broken by the summed KL.
- :func:`generalized_ships`: dataset-level Ships. M = last-layer hidden state at the last token of
  each of N queries (N x d), base and ablated; the score is the sum of the principal angles (in
  degrees) between the top-r left-singular subspaces of the two matrices.
- :func:`sahara`: greedy search for the head set with the largest dataset-level Ships.

A head is ablated by scaling its query by ``eps`` (attention becomes uniform, the paper's
"undifferentiated attention"; the default) or by scaling its output z by ``eps`` ("scaling
contribution"). Many ablated copies of a query run in one batch, with a different head
ablated per batch row (per-row query scales, see ``HeadModel.scale_queries``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import scipy.linalg
import torch
from headscope.progress import tqdm

from headscope.errors import HeadscopeError
from headscope.heads import head_masks
from headscope.model import HeadModel
from headscope.remote import kl_divergence
from headscope.analyzers import registry
from headscope.io import write_whole
from headscope.scores import HeadScores
from headscope.sharding import Part, Shard, as_part, batches, owned
from headscope.tasks.safety_prompts import encode_prompts
from headscope.validate import read_json

Head = tuple[int, int]
ABLATIONS = ("query", "output")


# ------------------------------------------------------------------------------ ablation per batch row
@contextlib.contextmanager
def ablate_rows(hm: HeadModel, rows: Sequence[Sequence[Head]], eps: float = 1e-4, ablation: str = "query") -> Iterator[None]:
    """Ablate a different head set in each batch row: row i scales the heads in ``rows[i]`` by eps.

    ``ablation="query"`` multiplies their queries by eps (near-uniform attention, the paper's
    default); ``"output"`` multiplies their output z by eps.
    """
    if ablation not in ABLATIONS:
        raise HeadscopeError(f"unknown Ships ablation {ablation!r}; choose 'query' (scale q) or 'output' (scale z)")
    g = hm.geometry
    hit = torch.stack([head_masks(hm.check_heads(heads), g.n_layers, g.n_heads) for heads in rows])
    scale = torch.where(hit, eps, 1.0)
    layers = sorted({layer for heads in rows for layer, _ in heads})
    with contextlib.ExitStack() as stack:
        if ablation == "query":
            for layer in layers:
                stack.enter_context(hm.scale_queries(layer, scale[:, layer].to(hm.device)))
        elif layers:
            factor = scale.to(hm.device)

            def scale_z(layer: int, z: torch.Tensor, positions: range) -> torch.Tensor:
                if layer not in layers:
                    return z
                return z * factor[:, layer].to(z.dtype).view(z.shape[0], 1, -1, 1)

            stack.enter_context(hm.edit_z(scale_z))
        yield


def _encode(hm: HeadModel, prompts, template: str) -> list[list[int]]:
    if len(prompts) == 0:
        raise HeadscopeError("no prompts given; pass at least one harmful query")
    if isinstance(prompts[0], str):
        return encode_prompts(hm.tokenizer, prompts, template)
    return [list(map(int, p)) for p in prompts]


def _ids(hm: HeadModel, prompt: Sequence[int], copies: int) -> torch.Tensor:
    return torch.tensor([list(prompt)], device=hm.device).expand(copies, -1)


# ------------------------------------------------------------------------------ Ships
@torch.no_grad()
def ships_per_query(
    hm: HeadModel,
    prompt: Sequence[int],
    heads: Sequence[Head] | None = None,
    eps: float = 1e-4,
    ablation: str = "query",
    batch_size: int = 32,
    keep: set[Head] | None = None,
) -> torch.Tensor:
    """Ships of every head for one query (token ids): a [layers, heads] KL tensor (NaN where unscored).

    Each head is ablated alone; ``batch_size`` ablated copies of the query share a forward pass.
    ``keep``: a shard's heads; batches without one are skipped, the others run unchanged.
    """
    heads = hm.all_heads() if heads is None else hm.check_heads(heads)
    p_base = torch.softmax(hm.model(_ids(hm, prompt, 1), logits_to_keep=1).logits[:, -1].double(), -1)
    out = torch.full((hm.geometry.n_layers, hm.geometry.n_heads), float("nan"), dtype=torch.float64)
    for chunk in batches(heads, batch_size, keep):
        with ablate_rows(hm, [[h] for h in chunk], eps, ablation):
            logits = hm.model(_ids(hm, prompt, len(chunk)), logits_to_keep=1).logits[:, -1].double()
        kl = kl_divergence(p_base, torch.softmax(logits, -1)).cpu()
        for (layer, head), value in zip(chunk, kl):
            out[layer, head] = value
    return out


def rank_by_query_counts(kl: torch.Tensor, top_per_query: int = 10) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dataset ranking from per-query Ships ``kl`` [N, layers, heads].

    Returns (score, count, summed KL): count = how many queries have the head among their
    ``top_per_query`` highest KL; score = count + summed KL / (max summed KL * 1.001), so
    sorting by score sorts by count with ties broken by summed KL.
    """
    n, layers, heads = kl.shape
    flat = torch.nan_to_num(kl.reshape(n, -1), nan=-math.inf)
    count = torch.zeros(layers * heads, dtype=torch.float64)
    for row in flat:
        count[row.topk(min(top_per_query, int(torch.isfinite(row).sum()))).indices] += 1
    total = torch.nan_to_num(kl, nan=0.0).sum(0).reshape(-1).double()
    top = float(total.max()) if total.numel() else 0.0
    frac = total / (top * 1.001) if top > 0 else torch.zeros_like(total)
    unscored = torch.isnan(kl).all(0).reshape(-1)  # heads left out (``heads=``) stay unscored
    score = (count + frac).masked_fill(unscored, math.nan)
    shape = (layers, heads)
    return score.view(shape), count.view(shape), total.view(shape)


def ships(
    hm: HeadModel,
    prompts,
    eps: float = 1e-4,
    ablation: str = "query",
    top_per_query: int = 10,
    template: str = "reference",
    batch_size: int = 32,
    progress: bool = True,
    heads: Sequence[Head] | None = None,
    shard: Shard | None = None,
) -> HeadScores:
    """Ships (Zhou et al. 2024): rank heads by how many harmful queries have them in their top-10 KL.

    ``prompts``: query strings (formatted with ``template``) or token-id lists. ``eps``: query
    (or output) scale of the ablated head [1e-4; the paper also uses 1e-5]. ``heads``: score only
    these (the others stay NaN, unscored). The result's ``per_query`` attribute holds the KL
    tensor [N, layers, heads]. ``shard``: score only that shard's heads (a part for
    ``headscope merge``, which does the ranking).
    """
    if eps < 0:
        raise HeadscopeError(f"eps must be >= 0; got {eps}")
    ids = _encode(hm, prompts, template)
    keep = owned(shard, hm.all_heads() if heads is None else hm.check_heads(heads))
    per_query = torch.stack(
        [ships_per_query(hm, p, heads=heads, eps=eps, ablation=ablation, batch_size=batch_size,
                         keep=keep if shard else None)
         for p in tqdm(ids, desc="ships", disable=not progress)]
    )
    params = {"eps": eps, "ablation": ablation, "top_per_query": top_per_query, "queries": len(ids),
              "template": template, "score": "count of queries with the head in their top-k + summed-KL tie-break"}
    if shard is None:
        return ships_result(per_query, hm.name, params)
    per_query[:, ~head_masks(keep, hm.geometry.n_layers, hm.geometry.n_heads)] = float("nan")
    return as_part(HeadScores(per_query.sum(0), "ships", hm.name, params), shard, keep,  # summed KL, NaN off the shard
                 per_query=per_query)


def ships_result(per_query: torch.Tensor, model: str, params: dict) -> HeadScores:
    """The Ships ranking from the per-query KL [N, layers, heads] (also what ``headscope merge`` calls)."""
    score, count, total = rank_by_query_counts(per_query, params["top_per_query"])
    result = HeadScores(score, method="ships", model=model, params=params)
    result.per_query, result.count, result.summed_kl = per_query, count, total
    return result


# ------------------------------------------------------------------------------ dataset-level Ships
def principal_angles(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Principal angles (radians, largest first) between the column spaces of ``a`` and ``b``:
    ``scipy.linalg.subspace_angles`` (Knyazev & Argentati 2002: sines below 45 degrees, exact where
    arccos loses precision)."""
    return scipy.linalg.subspace_angles(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))


def subspace_shift(m_base: torch.Tensor | np.ndarray, m_ablated: torch.Tensor | np.ndarray, r: int = 1) -> float:
    """Dataset-level Ships between two [N, d] matrices: the principal angles, in degrees, between
    their top-r left singular subspaces (sample space), summed. [r = 1 in the reference code; the
    paper writes top r.]"""
    m_base, m_ablated = (np.asarray(torch.as_tensor(m).double().cpu()) for m in (m_base, m_ablated))
    if m_base.shape != m_ablated.shape or m_base.ndim != 2:
        raise HeadscopeError(f"need two [N, d] matrices of one shape; got {m_base.shape} and {m_ablated.shape}")
    if not 1 <= r <= min(m_base.shape):
        raise HeadscopeError(f"r must lie in 1..{min(m_base.shape)} (min of queries and width); got {r}")
    u_base = np.linalg.svd(m_base, full_matrices=False)[0][:, :r]
    u_abl = np.linalg.svd(m_ablated, full_matrices=False)[0][:, :r]
    return float(np.degrees(principal_angles(u_base, u_abl)).sum())


def _groups(ids: Sequence[Sequence[int]]) -> list[list[int]]:
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(ids):
        by_length[len(p)].append(i)
    return list(by_length.values())


@torch.no_grad()
def last_hidden_states(
    hm: HeadModel,
    ids: Sequence[Sequence[int]],
    head_sets: Sequence[Sequence[Head]] = ((),),
    eps: float = 1e-4,
    ablation: str = "query",
    batch_size: int = 64,
    bar=None,
    keep_sets: set[int] | None = None,
) -> torch.Tensor:
    """M [sets, N, d]: the last layer's hidden state at the last token of every query, with each
    head set ablated (``()`` = none). Queries of one length and several head sets share a batch.
    ``keep_sets``: a shard's head sets; batches without one are skipped, the others run unchanged."""
    d = hm.geometry.d_model
    out = torch.zeros(len(head_sets), len(ids), d, dtype=torch.float64)
    jobs = [(s, q) for group in _groups(ids) for s in range(len(head_sets)) for q in group]
    # jobs are ordered by length group, so cut batches only where the length stays the same
    start = 0
    while start < len(jobs):
        length = len(ids[jobs[start][1]])
        stop = start
        while stop < len(jobs) and stop - start < batch_size and len(ids[jobs[stop][1]]) == length:
            stop += 1
        chunk = jobs[start:stop]
        sets_done = stop // len(ids) - start // len(ids)  # ``bar`` counts head sets: one per len(ids) rows
        start = stop
        if keep_sets is not None and keep_sets.isdisjoint(s for s, _ in chunk):
            if bar is not None:
                bar.update(sets_done)
            continue
        batch = torch.tensor([ids[q] for _, q in chunk], device=hm.device)
        with ablate_rows(hm, [head_sets[s] for s, _ in chunk], eps, ablation):
            hidden = hm.model(batch, output_hidden_states=True, logits_to_keep=1).hidden_states[-1][:, -1]
        for (s, q), h in zip(chunk, hidden.double().cpu()):
            out[s, q] = h
        if bar is not None:
            bar.update(sets_done)
    return out


def generalized_ships(
    hm: HeadModel,
    prompts,
    heads: Sequence[Head] | None = None,
    r: int = 1,
    eps: float = 1e-4,
    ablation: str = "query",
    template: str = "reference",
    batch_size: int = 64,
    progress: bool = True,
    shard: Shard | None = None,
) -> HeadScores:
    """Dataset-level Ships of every head ablated alone (Zhou et al. 2024), in degrees.
    ``shard``: score only that shard's heads (a part for ``headscope merge``)."""
    ids = _encode(hm, prompts, template)
    heads = hm.all_heads() if heads is None else hm.check_heads(heads)
    keep = owned(shard, heads)
    base = last_hidden_states(hm, ids, [()], eps, ablation, batch_size)[0]
    with tqdm(total=len(heads), desc="generalized ships", unit="head", disable=not progress) as bar:
        mats = last_hidden_states(hm, ids, [[h] for h in heads], eps, ablation, batch_size, bar,
                                  keep_sets={i for i, h in enumerate(heads) if h in keep} if shard else None)
    scores = torch.full((hm.geometry.n_layers, hm.geometry.n_heads), float("nan"))
    for (layer, head), m in zip(heads, mats):
        if (layer, head) in keep:
            scores[layer, head] = subspace_shift(base, m, r)
    return as_part(HeadScores(scores, "generalized-ships", hm.name,
                            {"r": r, "eps": eps, "ablation": ablation, "queries": len(ids), "template": template}),
                 shard, keep)


# ------------------------------------------------------------------------------ Sahara
def _fingerprint(ids: Sequence[Sequence[int]]) -> str:
    return hashlib.sha256(json.dumps([list(p) for p in ids]).encode()).hexdigest()[:16]


def _read_state(path: Path) -> dict:
    """A Sahara state file as :func:`sahara` writes it; any other content is an error naming the fix."""
    saved = read_json(path, "state file", "delete it to start over, or pass another --state file")
    fields = {"settings": dict, "chosen": list, "scores": list, "first_step": dict}
    if not isinstance(saved, dict) or not all(isinstance(saved.get(k), t) for k, t in fields.items()):
        raise HeadscopeError(f"state file {path} is not a Sahara state (needs {', '.join(fields)}); "
                             "delete it to start over, or pass another --state file")
    heads_ok = all(isinstance(h, list) and len(h) == 2 and all(isinstance(x, int) for x in h) for h in saved["chosen"])
    scores_ok = all(isinstance(x, (int, float)) and math.isfinite(x) for x in saved["scores"])
    if not heads_ok or not scores_ok:
        raise HeadscopeError(f"state file {path} holds malformed heads or scores; delete it to start over")
    return saved


def sahara(
    hm: HeadModel,
    prompts,
    max_heads: int = 3,
    min_score: float | None = None,
    r: int = 1,
    eps: float = 1e-4,
    ablation: str = "query",
    candidates: Sequence[Head] | None = None,
    template: str = "reference",
    batch_size: int = 64,
    state: str | Path | None = None,
    progress: bool = True,
) -> HeadScores:
    """Sahara (Zhou et al. 2024): greedily grow the head set with the largest dataset-level Ships.

    Start empty; each step ablates chosen + candidate for every remaining candidate, scores the
    subspace shift against the unablated base, and keeps the best. Stops after ``max_heads``
    heads, or once the score reaches ``min_score``. ``state``: a JSON file rewritten whole after
    every step (chosen heads and scores); a rerun with the same file and settings resumes.

    Scores: the chosen heads rank first in the order found (score 1 + steps left); every other
    head scores its single-head subspace shift from step 1, scaled into [0, 1).
    """
    ids = _encode(hm, prompts, template)
    if max_heads < 1:
        raise HeadscopeError(f"max_heads must be >= 1; got {max_heads}")
    pool = hm.all_heads() if candidates is None else hm.check_heads(candidates)
    max_heads = min(max_heads, len(pool))
    settings = {"r": r, "eps": eps, "ablation": ablation, "queries": len(ids), "prompts": _fingerprint(ids),
                "template": template, "model": hm.name, "candidates": [list(h) for h in pool]}
    chosen: list[Head] = []
    step_scores: list[float] = []
    first_step: dict[str, float] = {}
    state = Path(state) if state is not None else None
    if state is not None and state.exists():
        saved = _read_state(state)
        if saved.get("settings") != settings:
            raise HeadscopeError(
                f"state file {state} was written for other settings or prompts "
                f"({saved.get('settings')}); delete it or pass another --state file"
            )
        chosen, step_scores = [tuple(h) for h in saved["chosen"]], list(saved["scores"])
        if len(step_scores) != len(chosen) or not set(chosen) <= set(pool):
            raise HeadscopeError(f"state file {state} is inconsistent (chosen heads vs scores); delete it to start over")
        first_step = dict(saved.get("first_step", {}))

    def done() -> bool:
        reached = min_score is not None and step_scores and step_scores[-1] >= min_score
        return len(chosen) >= max_heads or bool(reached)

    base = last_hidden_states(hm, ids, [()], eps, ablation, batch_size)[0]
    left = sum(len(pool) - k for k in range(len(chosen), max_heads))  # candidate head sets to try
    with tqdm(total=left, desc="sahara", unit="head set", disable=not progress) as bar:
        while not done():
            remaining = [h for h in pool if h not in chosen]
            bar.set_postfix(step=len(chosen) + 1)
            mats = last_hidden_states(hm, ids, [chosen + [h] for h in remaining], eps, ablation, batch_size, bar)
            scores = [subspace_shift(base, m, r) for m in mats]
            if not chosen:
                first_step = {f"{l},{h}": s for (l, h), s in zip(remaining, scores)}
            best = int(np.argmax(scores))
            chosen.append(remaining[best])
            step_scores.append(scores[best])
            if state is not None:
                payload = {"method": "sahara", "settings": settings, "chosen": [list(h) for h in chosen],
                           "scores": step_scores, "first_step": first_step}
                write_whole(state, json.dumps(payload, indent=1) + "\n")

    g = hm.geometry
    out = torch.full((g.n_layers, g.n_heads), float("nan"))  # heads outside ``candidates`` stay unscored
    for layer, head in pool:
        out[layer, head] = 0.0
    top = max(first_step.values(), default=0.0)
    for key, s in first_step.items():
        layer, head = map(int, key.split(","))
        out[layer, head] = s / (top * 1.001) if top > 0 else 0.0
    for i, (layer, head) in enumerate(chosen):
        out[layer, head] = 1 + len(chosen) - i
    return HeadScores(out, "sahara", hm.name, {
        "r": r, "eps": eps, "ablation": ablation, "queries": len(ids), "template": template,
        "chosen": [list(h) for h in chosen], "step_scores": [round(s, 4) for s in step_scores],
    })


def join_ships(parts: Sequence[Part]) -> HeadScores:
    """``headscope merge`` of Ships parts: each head's per-query KL from the part that owns it, then
    the unsharded run's ranking by query counts (:func:`ships_result`)."""
    per_query = torch.full_like(parts[0].extra["per_query"], float("nan"))
    for part in parts:
        for layer, head in part.heads:
            per_query[:, layer, head] = part.extra["per_query"][:, layer, head]
    return ships_result(per_query, parts[0].model, parts[0].params)


registry.register(registry.Analyzer("ships", ships, join=join_ships, doc="Ships (Zhou et al. 2024)"))
registry.register(registry.Analyzer("generalized-ships", generalized_ships, doc="generalized Ships (Zhou et al. 2024)"))
