"""Circuits from clean/corrupted pairs: activation, attribution and path patching per head, and the
overlap of two circuits (Merullo et al. 2023, "Circuit Component Reuse Across Tasks"; Wang et al.
2022, "Interpretability in the Wild").

Metric: logit difference logit(answer) - logit(wrong) at the last position, averaged over pairs.
With ``clean`` / ``corrupt`` the metric of the unpatched runs:

- activation patching: run clean with one head's z (all positions) taken from the corrupt run;
  score = (clean - patched) / (clean - corrupt), the share of the clean-to-corrupt drop that head
  alone causes. Heads are batched: G heads x P pairs in one forward, a per-row head mask.
- attribution patching (EAP-style, first order): one clean forward and backward;
  patched - clean ~ sum over positions of grad_z(metric) . (z_corrupt - z_clean); same score.
  With ``steps`` = m > 1 it is EAP-IG (Hanna et al. 2024, "Have Faith in Faithfulness"): the
  gradient is averaged over m runs whose input embeddings interpolate from corrupt to clean
  (alpha = k/m, k = 1..m), which stays faithful when the clean/corrupt gap is far from first order.
- path patching (docs/METHODS.md): sender's z at the last position from the corrupt run, every other
  head frozen to its clean z; direct to the logits by default, or through ``receivers`` (their z is
  recorded in that run, then patched alone into a clean run). Score = sign * (patched - clean) /
  (corrupt - clean) * 100 with sign = -1 as docs/METHODS.md gives it; circuits select by |score|.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
import plotly.graph_objects as go
from headscope.progress import tqdm

from headscope.errors import HeadscopeError
from headscope.heads import head_masks
from headscope.plots import Figure
from headscope.model import HeadModel
from headscope.scores import HeadScores
from headscope.analyzers import registry
from headscope.sharding import Shard, as_part, batches, owned
from headscope.tasks.circuit_pairs import EncodedPairs

Head = tuple[int, int]


# ----------------------------------------------------------------------------------- metric
def logit_diff(logits: torch.Tensor, answer: torch.Tensor, wrong: torch.Tensor) -> torch.Tensor:
    """logit(answer) - logit(wrong) at the last position, per row ([B, N, V] -> [B])."""
    last = logits[:, -1].float()
    answer, wrong = answer.to(last.device).view(-1, 1), wrong.to(last.device).view(-1, 1)  # split models: logits live on the last block's device
    return last.gather(1, answer).squeeze(1) - last.gather(1, wrong).squeeze(1)


def _check(groups: Sequence[EncodedPairs]) -> list[EncodedPairs]:
    if isinstance(groups, EncodedPairs):
        groups = [groups]
    if not groups or sum(len(g) for g in groups) == 0:
        raise HeadscopeError("no circuit pairs given; encode some with headscope.tasks.circuit_pairs.encode_pairs")
    return list(groups)


@torch.no_grad()
def _run(hm: HeadModel, ids: torch.Tensor, answer, wrong, capture: bool = False):
    """Metric per row, and z of every layer ({layer: [B, N, H, d]}) when ``capture``."""
    if not capture:
        return logit_diff(hm.model(input_ids=ids.to(hm.device)).logits, answer, wrong), None
    with hm.capture_z() as cap:
        out = hm.model(input_ids=ids.to(hm.device)).logits
    return logit_diff(out, answer, wrong), dict(cap.z)


def baseline(hm: HeadModel, groups: Sequence[EncodedPairs]) -> tuple[float, float]:
    """Mean logit difference of the clean and of the corrupt prompts."""
    groups = _check(groups)
    clean = sum(float(_run(hm, g.clean, g.answer, g.wrong)[0].sum()) for g in groups)
    corrupt = sum(float(_run(hm, g.corrupt, g.answer, g.wrong)[0].sum()) for g in groups)
    n = sum(len(g) for g in groups)
    return clean / n, corrupt / n


def _effect_denominator(clean: float, corrupt: float) -> float:
    if abs(clean - corrupt) < 1e-6:
        raise HeadscopeError(
            f"clean and corrupt prompts give the same logit difference ({clean:.4f}); the corruption changes "
            "nothing the model uses, so patching effects are undefined. Check the pairs (answer/wrong tokens).")
    return clean - corrupt


# ----------------------------------------------------------------------------------- activation patching
def _patch_rows(sources: dict[int, torch.Tensor], row_heads: torch.Tensor, position: slice | None = None):
    """edit_z function: where row_heads[row, layer, head], take z from ``sources`` (rows aligned)."""

    def edit(layer: int, z: torch.Tensor, positions: range) -> torch.Tensor:
        mask = row_heads[:, layer].to(z.device)  # [R, H]
        if not mask.any():
            return z
        src = sources[layer].to(device=z.device, dtype=z.dtype)
        sel = mask.view(mask.shape[0], 1, mask.shape[1], 1)
        if position is None:
            return torch.where(sel, src, z)
        out = z.clone()
        out[:, position] = torch.where(sel, src[:, position], z[:, position])
        return out

    return edit


@torch.no_grad()
def _one_head_per_block(chunk: Sequence[Head], rows_per_head: int, g) -> torch.Tensor:
    """[len(chunk) * rows_per_head, layers, heads] mask: block k of rows marks chunk[k]."""
    mask = torch.zeros(len(chunk) * rows_per_head, g.n_layers, g.n_heads, dtype=torch.bool)
    for k, (layer, head) in enumerate(chunk):
        mask[k * rows_per_head : (k + 1) * rows_per_head, layer, head] = True
    return mask


def activation_patching(hm: HeadModel, groups: Sequence[EncodedPairs], heads: Iterable[Head] | None = None,
                        heads_per_batch: int = 8, progress: bool = True, shard: Shard | None = None) -> HeadScores:
    """Per-head activation patching (corrupt z into the clean run, all positions); batched over heads.
    ``shard``: score only that shard's heads (a part for ``headscope merge``)."""
    groups = _check(groups)
    g = hm.geometry
    heads = hm.all_heads() if heads is None else hm.check_heads(heads)
    keep = owned(shard, heads)
    totals = torch.zeros(g.n_layers, g.n_heads)
    clean_sum = corrupt_sum = 0.0
    n = sum(len(x) for x in groups)
    chunks = batches(heads, heads_per_batch, keep)
    bar = tqdm(total=len(chunks) * len(groups), desc="activation patching", disable=not progress)
    for grp in groups:
        clean, _ = _run(hm, grp.clean, grp.answer, grp.wrong)
        corrupt, z_corrupt = _run(hm, grp.corrupt, grp.answer, grp.wrong, capture=True)
        clean_sum += float(clean.sum())
        corrupt_sum += float(corrupt.sum())
        P = len(grp)
        for chunk in chunks:
            G = len(chunk)
            row_heads = _one_head_per_block(chunk, P, g)
            sources = {layer: z.repeat(G, 1, 1, 1) for layer, z in z_corrupt.items()}
            with hm.edit_z(_patch_rows(sources, row_heads)):
                patched, _ = _run(hm, grp.clean.repeat(G, 1), grp.answer.repeat(G), grp.wrong.repeat(G))
            for k, (layer, head) in enumerate(chunk):
                totals[layer, head] += float(patched[k * P : (k + 1) * P].sum())
            bar.update()
    bar.close()
    clean, corrupt = clean_sum / n, corrupt_sum / n
    scores = (clean - totals / n) / _effect_denominator(clean, corrupt)
    scores[~head_masks(keep, g.n_layers, g.n_heads)] = float("nan")
    return as_part(HeadScores(scores, method="activation_patching", model=hm.name,
                              params={"pairs": n, "clean_logit_diff": clean, "corrupt_logit_diff": corrupt}), shard, keep)


# ----------------------------------------------------------------------------------- attribution patching
def attribution_patching(hm: HeadModel, groups: Sequence[EncodedPairs], steps: int = 1) -> HeadScores:
    """First-order estimate of activation patching from one backward pass per group (EAP style).

    ``steps`` > 1: EAP-IG (Hanna et al. 2024): average grad_z(metric) over ``steps`` forward and
    backward passes at input embeddings lerp(corrupt, clean, k / steps), k = 1..steps, then take
    its product with (z_corrupt - z_clean). ``steps=1`` is the clean run alone: plain EAP.
    """
    if steps < 1:
        raise HeadscopeError(f"steps must be at least 1; got {steps}")
    groups = _check(groups)
    g = hm.geometry
    totals = torch.zeros(g.n_layers, g.n_heads, dtype=torch.float64)
    clean_sum = corrupt_sum = 0.0
    n = sum(len(x) for x in groups)
    embed = hm.model.get_input_embeddings()
    for grp in groups:
        corrupt, z_corrupt = _run(hm, grp.corrupt, grp.answer, grp.wrong, capture=True)
        answer, wrong = grp.answer, grp.wrong
        if steps > 1:
            with torch.no_grad():
                e_clean, e_corrupt = embed(grp.clean.to(hm.device)), embed(grp.corrupt.to(hm.device))
        grad_sum: dict[int, torch.Tensor] = {}
        for k in range(1, steps + 1):  # the last step (alpha = 1) is the clean run
            kept: dict[int, torch.Tensor] = {}

            def keep(layer: int, z: torch.Tensor, positions: range) -> torch.Tensor:
                z = z.clone() if z.requires_grad else z.detach().requires_grad_(True)
                kept[layer] = z
                return z

            with torch.enable_grad(), hm.edit_z(keep):
                if steps == 1:
                    logits = hm.model(input_ids=grp.clean.to(hm.device)).logits
                else:  # torch.lerp is exact at weight 1: the last step embeds the clean prompt
                    logits = hm.model(inputs_embeds=torch.lerp(e_corrupt, e_clean, k / steps)).logits
                clean = logit_diff(logits, answer, wrong)
                layers = sorted(kept)
                grads = torch.autograd.grad(clean.sum(), [kept[layer] for layer in layers], allow_unused=True)
            for layer, grad in zip(layers, grads):
                if grad is not None:
                    grad_sum[layer] = grad_sum[layer] + grad if layer in grad_sum else grad
        for layer, grad in grad_sum.items():
            delta = z_corrupt[layer].to(grad.device, grad.dtype) - kept[layer].detach()
            totals[layer] += (grad / steps * delta).sum(dim=(0, 1, 3)).double().cpu()  # [H]
        clean_sum += float(clean.detach().sum())
        corrupt_sum += float(corrupt.sum())
    clean, corrupt = clean_sum / n, corrupt_sum / n
    scores = -(totals / n).float() / _effect_denominator(clean, corrupt)
    return HeadScores(scores, method="attribution_patching", model=hm.name,
                      params={"pairs": n, "clean_logit_diff": clean, "corrupt_logit_diff": corrupt, "steps": steps})


# ----------------------------------------------------------------------------------- path patching
@torch.no_grad()
def path_patching(hm: HeadModel, groups: Sequence[EncodedPairs], receivers: Iterable[Head] | None = None,
                  senders: Iterable[Head] | None = None, sign: float = -1.0, heads_per_batch: int = 8,
                  progress: bool = True, shard: Shard | None = None) -> HeadScores:
    """Path patching sender -> receivers (or -> logits), per sender, in percent (docs/METHODS.md).

    Pass 1: clean and corrupt z of every head. Pass 2 per sender: clean input, every head frozen to
    its clean z except the sender, whose z at the last position comes from the corrupt run, and the
    receivers, which compute freely and are recorded. Pass 3: clean input with only the receivers'
    z replaced by the recorded values. Without receivers, pass 2's output is the patched metric.
    ``shard``: score only that shard's senders (a part for ``headscope merge``).
    """
    groups = _check(groups)
    g = hm.geometry
    senders = hm.all_heads() if senders is None else hm.check_heads(senders)
    receivers = [] if receivers is None else hm.check_heads(receivers)
    free = head_masks(receivers, g.n_layers, g.n_heads)
    totals = torch.zeros(g.n_layers, g.n_heads)
    clean_sum = corrupt_sum = 0.0
    n = sum(len(x) for x in groups)
    keep = owned(shard, senders)
    chunks = batches(senders, heads_per_batch, keep)
    bar = tqdm(total=len(chunks) * len(groups), desc="path patching", disable=not progress)
    for grp in groups:
        clean, z_clean = _run(hm, grp.clean, grp.answer, grp.wrong, capture=True)
        corrupt, z_corrupt = _run(hm, grp.corrupt, grp.answer, grp.wrong, capture=True)
        clean_sum += float(clean.sum())
        corrupt_sum += float(corrupt.sum())
        P = len(grp)
        for chunk in chunks:
            G = len(chunk)
            sender_rows = _one_head_per_block(chunk, P, g)

            def freeze(layer: int, z: torch.Tensor, positions: range) -> torch.Tensor:
                frozen = z_clean[layer].to(device=z.device, dtype=z.dtype).repeat(G, 1, 1, 1)
                keep_free = free[layer].to(z.device).view(1, 1, -1, 1)
                out = torch.where(keep_free, z, frozen)
                send = sender_rows[:, layer].to(z.device).view(G * P, -1, 1)  # [R, H, 1]
                last = z_corrupt[layer][:, -1].to(device=z.device, dtype=z.dtype).repeat(G, 1, 1)
                out[:, -1] = torch.where(send, last, out[:, -1])
                recorded[layer] = out.detach()  # what the receivers carry after the edit
                return out

            ids, answer, wrong = grp.clean.repeat(G, 1), grp.answer.repeat(G), grp.wrong.repeat(G)
            recorded: dict[int, torch.Tensor] = {}
            with hm.edit_z(freeze):
                patched, _ = _run(hm, ids, answer, wrong)
            if receivers:
                rows = free.unsqueeze(0).expand(G * P, -1, -1)
                with hm.edit_z(_patch_rows(recorded, rows)):
                    patched, _ = _run(hm, ids, answer, wrong)
            for k, (layer, head) in enumerate(chunk):
                totals[layer, head] += float(patched[k * P : (k + 1) * P].sum())
            bar.update()
    bar.close()
    clean, corrupt = clean_sum / n, corrupt_sum / n
    scores = sign * (totals / n - clean) / -_effect_denominator(clean, corrupt) * 100.0
    scores[~head_masks(keep, g.n_layers, g.n_heads)] = float("nan")
    return as_part(HeadScores(scores, method="path_patching", model=hm.name,
                              params={"pairs": n, "receivers": [list(r) for r in receivers] or "logits", "sign": sign,
                                      "clean_logit_diff": clean, "corrupt_logit_diff": corrupt}), shard, keep)


# ----------------------------------------------------------------------------------- circuits
def circuit(scores: HeadScores, top_p: float | None = 0.02, top_k: int | None = None,
            threshold: float | None = None, absolute: bool = True) -> set[Head]:
    """The heads of a circuit: top ``top_k``, else above ``threshold``, else the top ``top_p`` share
    [2%, Merullo et al.] (at least one head). ``absolute`` ranks by |score| (path patching's sign)."""
    values = scores.scores.abs() if absolute else scores.scores
    ranked = HeadScores(torch.nan_to_num(values, nan=-math.inf), scores.method, scores.model)
    if top_k is not None:
        return set(ranked.top(top_k))
    if threshold is not None:
        return set(ranked.above(threshold))
    if top_p is None or not 0 < top_p <= 1:
        raise HeadscopeError(f"top_p must lie in (0, 1]; got {top_p}")
    return set(ranked.top(max(1, math.ceil(top_p * values.numel()))))


def overlap(a: Iterable[Head], b: Iterable[Head]) -> dict[str, float]:
    """|A&B|/|A|, |A&B|/|B|, Jaccard and the overlap coefficient |A&B| / min(|A|, |B|)."""
    a, b = {tuple(h) for h in a}, {tuple(h) for h in b}
    both = len(a & b)
    nan = float("nan")
    return {
        "size_a": len(a), "size_b": len(b), "shared": both,
        "share_of_a": both / len(a) if a else nan,
        "share_of_b": both / len(b) if b else nan,
        "jaccard": both / len(a | b) if a | b else nan,
        "overlap_coefficient": both / min(len(a), len(b)) if a and b else nan,
    }


def overlap_figure(a: Iterable[Head], b: Iterable[Head], n_layers: int, n_heads: int,
                   names: tuple[str, str] = ("A", "B")):
    """Plotly heatmap of the [layer x head] grid: 0 neither, 1 only A, 2 only B, 3 both."""


    grid = torch.zeros(n_layers, n_heads)
    for layer, head in a:
        grid[layer, head] += 1
    for layer, head in b:
        grid[layer, head] += 2
    labels = ["neither", f"only {names[0]}", f"only {names[1]}", "both"]
    colors = ["#f0f0f0", "#4c78a8", "#f58518", "#54a24b"]
    scale = [[edge, c] for i, c in enumerate(colors) for edge in (i / 4, (i + 1) / 4)]
    fig = Figure(go.Heatmap(
        z=grid.numpy(), x=list(range(n_heads)), y=list(range(n_layers)), zmin=-0.5, zmax=3.5,
        colorscale=scale, text=[[labels[int(v)] for v in row] for row in grid.tolist()],
        hovertemplate="layer %{y}, head %{x}: %{text}<extra></extra>",
        colorbar={"tickvals": [0, 1, 2, 3], "ticktext": labels},
    ))
    stats = overlap(a, b)
    fig.update_layout(
        title=f"circuit overlap {names[0]} vs {names[1]}: {stats['shared']} shared, "
              f"Jaccard {stats['jaccard']:.2f}, overlap coefficient {stats['overlap_coefficient']:.2f}",
        xaxis_title="head", yaxis_title="layer", yaxis={"autorange": "reversed"})
    return fig


registry.register(registry.Analyzer("activation_patching", activation_patching, doc="activation patching over heads"))
registry.register(registry.Analyzer("path_patching", path_patching, doc="path patching over sender heads"))
registry.register(registry.Analyzer("attribution_patching", attribution_patching,
                                    doc="attribution patching, first-order estimate (EAP style)"))
