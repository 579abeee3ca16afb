"""Head pursuit (Basile et al. 2025, "Head Pursuit: Probing Attention Specialization in Multimodal
Transformers").

Per head, what it writes to the residual stream, z[l,h] @ W_O[h], averaged over a sample's prompt
tokens: one row per sample, X in R^{n x d_model}. Dictionary: unembedding rows of the concept's
tokens (all pieces of each word). Simultaneous Orthogonal Matching Pursuit (SOMP) explains X with
k [50] atoms; the explained variance ratio ranks the heads for the concept. Editing multiplies the
top heads' z by alpha (-1 suppress, 5 enhance); the control edits random heads with the same
per-layer counts (10 draws).
"""

from __future__ import annotations

import math
import random
from typing import Iterable, Sequence

import torch
from headscope.progress import tqdm

from headscope.hf import devices
from headscope.errors import HeadscopeError
from headscope.analyzers import registry
from headscope.heads import same_layer_random_heads
from headscope.heads import head_masks
from headscope.model import HeadModel
from headscope.scores import HeadScores

Head = tuple[int, int]


# ----------------------------------------------------------------------------------- SOMP
def somp(X: torch.Tensor, dictionary: torch.Tensor, k: int = 50, normalize: bool = False) -> tuple[list[int], float]:
    """Simultaneous OMP: the chosen atom indices and the explained variance ratio of centred X.

    X [n, d] (one row per sample), dictionary [m, d] (one atom per row). Each step picks the atom
    maximising sum over samples |<residual, atom>|, refits X on the chosen atoms by least squares
    and sets residual = X - fit. k is capped at the dictionary size. ``normalize`` L2-normalises
    the atoms first (the authors' code does not: default off).
    """
    X = torch.as_tensor(X, dtype=torch.float64)
    D = torch.as_tensor(dictionary, dtype=torch.float64)
    if X.dim() != 2 or D.dim() != 2 or X.shape[1] != D.shape[1]:
        raise HeadscopeError(f"SOMP needs X [n, d] and a dictionary [m, d]; got {tuple(X.shape)} and {tuple(D.shape)}")
    if k < 1:
        raise HeadscopeError(f"k (atoms to select) must be >= 1; got {k}")
    if normalize:
        D = D / D.norm(dim=1, keepdim=True).clamp_min(1e-12)
    X = X - X.mean(0, keepdim=True)
    total = float(X.pow(2).sum())
    residual = X
    chosen: list[int] = []
    for _ in range(min(k, D.shape[0])):
        corr = (residual @ D.T).abs().sum(0)
        if chosen:
            corr[chosen] = -1.0
        chosen.append(int(corr.argmax()))
        atoms = D[chosen]  # [s, d]
        coef = torch.linalg.lstsq(atoms.T, X.T).solution  # [s, n]
        residual = X - (atoms.T @ coef).T
    evr = 1.0 - float(residual.pow(2).sum()) / total if total > 0 else float("nan")
    return chosen, evr


# ----------------------------------------------------------------------------------- signals
def output_weights(hm: HeadModel, layer: int) -> torch.Tensor:
    """W_O per head as [H, d_head, d_model]: z[h] @ W_O[h] is head h's write to the residual.

    nn.Linear (o_proj, BERT's dense) stores [d_model, H*d]; GPT-2's Conv1D c_proj stores [H*d, d_model].
    """
    g = hm.geometry
    module = hm._layers[layer].out_proj
    w = devices.weight(module)
    if type(module).__name__ == "Conv1D":
        w_in_out = w  # [H*d, d_model]
    else:
        w_in_out = w.T
    if w_in_out.shape[0] != g.n_heads * g.head_dim:
        raise HeadscopeError(f"layer {layer}'s output projection has input size {w_in_out.shape[0]}, "
                             f"not heads x head_dim = {g.n_heads * g.head_dim}")
    return w_in_out.reshape(g.n_heads, g.head_dim, -1)


@torch.no_grad()
def head_writes(hm: HeadModel, prompts: Sequence[Sequence[int]], progress: bool = False) -> torch.Tensor:
    """[n_samples, L, H, d_model]: each head's write z @ W_O averaged over the sample's tokens."""
    g = hm.geometry
    weights = [output_weights(hm, layer).float() for layer in range(g.n_layers)]
    rows = []
    for ids in tqdm(prompts, desc="head writes", disable=not progress):
        with hm.capture_z() as cap:
            hm.model(input_ids=torch.tensor([list(ids)], device=hm.device))
        per_layer = [torch.einsum("hd,hdm->hm", cap.z[layer][0].float().mean(0), weights[layer].to(cap.z[layer].device))
                     for layer in range(g.n_layers)]
        rows.append(torch.stack(per_layer).cpu())
    return torch.stack(rows)


def concept_token_ids(tokenizer, words: Iterable[str], with_space: bool = True) -> list[int]:
    """Token ids of every piece of every concept word, as written and after a space (BPE variants).

    Special tokens are left out: a word-level tokenizer maps an unknown word to ``<unk>``, which
    is no piece of the concept."""
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    ids: set[int] = set()
    words = [w.strip() for w in words if w.strip()]
    if not words:
        raise HeadscopeError("the concept has no words; give one word per line")
    for word in words:
        for text in ([word, " " + word] if with_space else [word]):
            ids.update(int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"])
    ids -= special
    if not ids:
        raise HeadscopeError(f"none of the concept's words ({', '.join(words[:5])}...) is in the tokenizer's "
                             "vocabulary (they all map to special tokens such as <unk>)")
    return sorted(ids)


def unembedding(hm: HeadModel) -> torch.Tensor:
    out = hm.model.get_output_embeddings() if hasattr(hm.model, "get_output_embeddings") else None
    if out is None:
        raise HeadscopeError(f"{type(hm.model).__name__} has no unembedding (output embeddings); head pursuit needs "
                             "a language-model head to build the concept dictionary")
    return devices.weight(out).float().cpu()


def head_pursuit(hm: HeadModel, prompts: Sequence[Sequence[int]], concept_ids: Sequence[int], k: int = 50,
                 normalize: bool = False, progress: bool = True) -> HeadScores:
    """Rank heads by the EVR of SOMP over the concept's unembedding rows (Basile et al. 2025)."""
    if len(prompts) < 2:
        raise HeadscopeError("head pursuit centres the signal over samples: give at least 2 prompts")
    return pursuit_scores(hm, head_writes(hm, prompts, progress=progress), concept_ids, k, normalize)


def pursuit_scores(hm: HeadModel, X: torch.Tensor, concept_ids: Sequence[int], k: int = 50,
                   normalize: bool = False) -> HeadScores:
    """SOMP EVR per head from head writes X [n_samples, L, H, d_model] (see :func:`head_writes`)."""
    if not len(concept_ids):
        raise HeadscopeError("the concept dictionary is empty")
    dictionary = unembedding(hm)[list(concept_ids)]
    g = hm.geometry
    scores = torch.zeros(g.n_layers, g.n_heads)
    atoms: dict[str, list[int]] = {}
    for layer, head in hm.all_heads():
        chosen, evr = somp(X[:, layer, head], dictionary, k=k, normalize=normalize)
        scores[layer, head] = evr
        atoms[f"{layer},{head}"] = [int(concept_ids[i]) for i in chosen[:5]]
    result = HeadScores(scores, method="head_pursuit", model=hm.name,
                        params={"k": min(k, len(concept_ids)), "normalize": normalize, "samples": int(X.shape[0]),
                                "concept_tokens": len(concept_ids)})
    result.atoms = atoms  # first chosen token ids per head
    return result


# ----------------------------------------------------------------------------------- editing
def scale_heads(heads: Iterable[Head], alpha: float, n_layers: int, n_heads: int):
    """edit_z function multiplying the given heads' z by alpha at all positions."""
    mask = head_masks(heads, n_layers, n_heads)

    def edit(layer: int, z: torch.Tensor, positions: range) -> torch.Tensor:
        if not mask[layer].any():
            return z
        factor = torch.where(mask[layer], torch.tensor(float(alpha)), torch.tensor(1.0)).to(z.device, z.dtype)
        return z * factor.view(1, 1, -1, 1)

    return edit


@torch.no_grad()
def concept_probability(hm: HeadModel, prompts: Sequence[Sequence[int]], concept_ids: Sequence[int],
                        batch_size: int = 32) -> float:
    """Mean over prompts of the next-token probability mass on the concept tokens (last position).

    Prompts run ``batch_size`` at a time, right-padded: under the causal mask a prompt's own tokens
    never see the padding, so each prompt's last-position logits are those of running it alone."""
    ids = torch.tensor(list(concept_ids))
    prompts = [list(p) for p in prompts]
    total = 0.0
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        lengths = torch.tensor([len(p) for p in chunk], device=hm.device)
        batch = torch.tensor([p + [p[-1]] * (int(lengths.max()) - len(p)) for p in chunk], device=hm.device)
        logits = hm.model(input_ids=batch).logits  # on the last block's device when the model is split
        last = logits[torch.arange(len(chunk), device=logits.device), lengths.to(logits.device) - 1].float()
        total += float(last.softmax(-1)[:, ids.to(logits.device)].sum())
    return total / len(prompts)


def edit_effect(hm: HeadModel, prompts, concept_ids, scores: HeadScores, alpha: float = -1.0,
                top: int | None = None, share: float = 0.01, draws: int = 10, seed: int = 0) -> dict[str, float]:
    """Concept probability with the top heads' z scaled by alpha, against random same-layer heads.

    ``top`` heads, or ``share`` [1%] of all heads (at least one). Returns base, edited, the mean
    and std of the random-control draws, and the heads edited.
    """
    g = hm.geometry
    k = top if top is not None else max(1, math.ceil(share * g.n_total))
    heads = scores.top(k)
    base = concept_probability(hm, prompts, concept_ids)
    with hm.edit_z(scale_heads(heads, alpha, g.n_layers, g.n_heads)):
        edited = concept_probability(hm, prompts, concept_ids)
    rng = random.Random(seed)
    control = []
    for _ in range(draws):
        rand = same_layer_random_heads(heads, g.n_heads, rng)
        with hm.edit_z(scale_heads(rand, alpha, g.n_layers, g.n_heads)):
            control.append(concept_probability(hm, prompts, concept_ids))
    t = torch.tensor(control) if control else torch.tensor([float("nan")])
    return {"alpha": alpha, "heads": heads, "base": base, "edited": edited,
            "random_mean": float(t.mean()), "random_std": float(t.std()) if len(control) > 1 else 0.0}


registry.register(registry.Analyzer("head_pursuit", head_pursuit, doc="head pursuit, SOMP (Basile et al. 2025)"))
