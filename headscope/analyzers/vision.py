"""Vision-aware heads: VHD and T-VHD (He et al. 2025, "Cracking the Code of Hallucination in LVLMs
with Vision-aware Head Divergence"); see docs/METHODS.md, "Vision-aware heads".

VHD[l, h] = || z_img - z_txt ||_2 at the last prompt token, where z is the head's output (the o_proj
input) once with the image tokens and once with the image token embeddings spliced out of the
sequence. Per layer, only when std(VHD_l) > 1, outlier heads (VHD > mean + std and ||z_txt||^2 >
mean + std of that layer) are zeroed. VHR reinforces the heads strictly above their layer's median
VHD in the chosen layers (LLaVA-1.5: the last 14 of 32; here the same share by default).
"""

from __future__ import annotations

from typing import Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from headscope import vision
from headscope.analyzers.pursuit import output_weights, pursuit_scores
from headscope.errors import HeadscopeError
from headscope.analyzers import registry
from headscope.model import HeadModel
from headscope.scores import HeadScores

Head = tuple[int, int]


def default_layers(n_layers: int) -> list[int]:
    """The reference's share of layers: the last 14 of 32 (LLaVA-1.5), at least one."""
    count = max(1, round(n_layers * 14 / 32))
    return list(range(n_layers - count, n_layers))


@torch.no_grad()
def head_divergence(hm: HeadModel, batch: dict, squared: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw VHD [B, L, H] at each prompt's last token, and ||z_txt||^2 [B, L, H].

    ``batch``: model inputs from :func:`headscope.vision.encode` (left-padded, so the last column is
    every prompt's last token). ``squared``: the squared L2 distance (one port's choice).
    """
    vision.require_vision(hm, "VHD")
    with hm.capture_z(positions="last") as cap:
        hm.model(**vision.with_positions(hm, batch))
    z_img = torch.stack([cap.z[layer][:, 0] for layer in cap.layers], 1).float()  # [B, L, H, d]
    with hm.capture_z(positions="last") as cap:
        hm.model(**vision.with_positions(hm, vision.without_image(hm, batch)))
    z_txt = torch.stack([cap.z[layer][:, 0] for layer in cap.layers], 1).float()
    dist = (z_img - z_txt).pow(2).sum(-1)
    return (dist if squared else dist.sqrt()).cpu(), z_txt.pow(2).sum(-1).cpu()


def outlier_filter(vhd: torch.Tensor, txt_norm2: torch.Tensor) -> torch.Tensor:
    """Per layer (rows of [L, H]) with std(VHD_l) > 1: zero heads with VHD > mean + std and
    ||z_txt||^2 > mean + std (both over that layer's heads; torch's unbiased std)."""
    out = vhd.clone()
    for layer in range(vhd.shape[0]):
        v, t = vhd[layer], txt_norm2[layer]
        if v.numel() > 1 and float(v.std()) > 1:
            outliers = (v > v.mean() + v.std()) & (t > t.mean() + t.std())
            out[layer][outliers] = 0.0
    return out


def vision_aware_heads(hm: HeadModel, images: Sequence, prompts: Sequence[str], *, squared: bool = False,
                       filter_outliers: bool = True, layers: Sequence[int] | None = None, batch_size: int = 8,
                       progress: bool = False) -> HeadScores:
    """VHD per head, mean over (image, prompt) pairs (He et al. 2025). ``layers``: where VHR selects
    heads (stored in the scores' params; default :func:`default_layers`)."""
    if len(images) != len(prompts) or not len(images):
        raise HeadscopeError(f"VHD needs one image per prompt and at least one pair; got {len(images)} images, "
                             f"{len(prompts)} prompts")
    g = hm.geometry
    layers = default_layers(g.n_layers) if layers is None else sorted({int(x) for x in layers})
    if not layers or not all(0 <= x < g.n_layers for x in layers):
        raise HeadscopeError(f"VHD layers must lie in 0..{g.n_layers - 1}; got {layers}")
    total = torch.zeros(g.n_layers, g.n_heads)
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc="VHD", disable=not progress):
        batch = vision.encode(hm, images[start:start + batch_size], prompts[start:start + batch_size])
        vhd, txt = head_divergence(hm, batch, squared=squared)
        for b in range(vhd.shape[0]):
            total += outlier_filter(vhd[b], txt[b]) if filter_outliers else vhd[b]
    params = {"samples": len(images), "squared": squared, "filter_outliers": filter_outliers, "layers": layers}
    return HeadScores(total / len(images), method="vhd", model=hm.name, params=params)


def select_heads(scores: HeadScores, layers: Sequence[int] | None = None) -> list[Head]:
    """VHR's heads: per chosen layer, the heads with VHD strictly above that layer's median.

    ``layers`` defaults to the scores' own ``params["layers"]``, else :func:`default_layers`."""
    layers = layers if layers is not None else scores.params.get("layers") or default_layers(scores.n_layers)
    heads = []
    for layer in layers:
        row = scores.scores[int(layer)]
        median = row.median()  # torch: the lower middle value for an even count
        heads += [(int(layer), int(h)) for h in (row > median).nonzero().flatten().tolist()]
    return heads


@torch.no_grad()
def token_vhd(hm: HeadModel, image, prompt: str, max_new_tokens: int = 16, top_k: int = 10,
              reduce: str = "sum", squared: bool = False) -> pd.DataFrame:
    """T-VHD per generated token: generate greedily with the image, then for each generated token the
    VHD of every head at the position that predicted it (image vs image spliced out, same text prefix),
    reduced over the top-k heads. ``reduce``: "sum" or "mean" of the top-k (the paper's choice is not
    pinned down by docs/METHODS.md; both are offered)."""
    if reduce not in ("sum", "mean"):
        raise HeadscopeError(f"reduce must be 'sum' or 'mean'; got {reduce!r}")
    batch = vision.encode(hm, [image], [prompt])
    n = batch["input_ids"].shape[1]
    out = hm.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=vision.pad_id(hm))
    new = out[:, n:]
    full = dict(batch, input_ids=out, attention_mask=torch.ones_like(out))
    text = vision.without_image(hm, full)
    rows_img = list(range(n - 1, out.shape[1] - 1))  # the row that predicted each new token
    shift = out.shape[1] - text["input_ids"].shape[1]
    with hm.capture_z(positions=rows_img) as cap:
        hm.model(**full)
    z_img = torch.stack([cap.z[layer][0] for layer in cap.layers], 1).float()  # [T, L, H, d]
    with hm.capture_z(positions=[r - shift for r in rows_img]) as cap:
        hm.model(**text)
    z_txt = torch.stack([cap.z[layer][0] for layer in cap.layers], 1).float()
    dist = (z_img - z_txt).pow(2).sum(-1)
    vhd = (dist if squared else dist.sqrt()).flatten(1)  # [T, L*H]
    k = min(top_k, vhd.shape[1])
    top = vhd.topk(k, dim=1).values
    value = top.sum(1) if reduce == "sum" else top.mean(1)
    tokens = hm.tokenizer.convert_ids_to_tokens(new[0].tolist()) if hm.tokenizer is not None else new[0].tolist()
    return pd.DataFrame({"step": range(len(rows_img)), "token_id": new[0].tolist(), "token": tokens,
                         "t_vhd": value.cpu().numpy()})


# ----------------------------------------------------------------------------------- head pursuit
@torch.no_grad()
def image_head_writes(hm: HeadModel, images: Sequence, prompts: Sequence[str], batch_size: int = 8) -> torch.Tensor:
    """[n, L, H, d_model]: each head's write z @ W_O averaged over the sample's image tokens (Basile et
    al. 2025's signal for a VLM)."""

    g = hm.geometry
    weights = [output_weights(hm, layer).float() for layer in range(g.n_layers)]
    rows = []
    for start in range(0, len(images), batch_size):
        batch = vision.encode(hm, images[start:start + batch_size], prompts[start:start + batch_size])
        image = vision.image_mask(hm, batch["input_ids"]).float()  # [B, N]
        with hm.capture_z() as cap:
            hm.model(**vision.with_positions(hm, batch))
        per_layer = []
        for layer in range(g.n_layers):
            z = cap.z[layer].float()  # [B, N, H, d]
            mean_z = torch.einsum("bn,bnhd->bhd", image, z) / image.sum(1).clamp_min(1).view(-1, 1, 1)
            per_layer.append(torch.einsum("bhd,hdm->bhm", mean_z, weights[layer].to(z.device)))
        rows.append(torch.stack(per_layer, 1).cpu())
    return torch.cat(rows)


def image_head_pursuit(hm: HeadModel, images: Sequence, prompts: Sequence[str], concept_ids: Sequence[int],
                       k: int = 50, normalize: bool = False) -> HeadScores:
    """Head pursuit over image tokens: SOMP EVR per head of the image-token writes against the
    concept's unembedding rows (Basile et al. 2025)."""

    if len(images) < 2:
        raise HeadscopeError("head pursuit centres the signal over samples: give at least 2 images")
    return pursuit_scores(hm, image_head_writes(hm, images, prompts), concept_ids, k, normalize)


registry.register(registry.Analyzer("vhd", vision_aware_heads, doc="vision-aware head divergence (He et al. 2025)"))
