"""Attention sinks: received-attention sink scores, massive activations, secondary sinks and the
visual-sink test.

- Received-attention sink score (Gu et al. 2024, "When Attention Sink Emerges in Language Models"):
  alpha[l,h](k) = mean over the queries that can see k of A[i,k] (causal: i >= k; an encoder: all
  queries). Token k is a sink of head (l,h) when alpha > eps [0.3].
- Massive activations (Sun et al. 2024, "Massive Activations in Large Language Models"): hidden
  state entries with |h| > 100 and > 1000x the median |h| of that state.
- Secondary sinks ("On the Existence and Behaviour of Secondary Attention Sinks"): tokens whose
  hidden state aligns with the first token's (|cos| > 0.9); lifetime in layers classifies them.
- Visual sinks (Kang et al. 2025, "See What You Are Told: Visual Attention Sink in LMMs", VAR):
  phi(h) = |h / sqrt(mean(h^2) + 1e-6)| on each layer's residual input from layer 2 on; token j is
  a sink when max over the model's massive dims of phi(h_j) > tau [20].

All attention numbers come from the fused statistics pass (``received``, ``group_mass``), never from
an [H, N, N] pattern. Texts are scored one at a time (no padding), so every query row is real.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import pandas as pd
import torch

from headscope.errors import HeadscopeError
from headscope.analyzers import registry
from headscope.model import HeadModel
from headscope.scores import HeadScores


# ----------------------------------------------------------------------------------- inputs
def encode_texts(hm: HeadModel, texts: Sequence[str] | Sequence[Sequence[int]], max_tokens: int | None = None):
    """Token id lists of texts (strings need the model's tokenizer; id lists pass through)."""
    if not texts:
        raise HeadscopeError("no texts given; pass at least one text (one per line with --text FILE)")
    out = []
    for text in texts:
        if isinstance(text, str):
            if hm.tokenizer is None:
                raise HeadscopeError(f"{hm.name} has no tokenizer; pass token id lists instead of strings")
            ids = hm.tokenizer(text)["input_ids"]
        else:
            ids = [int(t) for t in text]
        if max_tokens is not None:
            ids = ids[:max_tokens]
        if len(ids) < 2:
            raise HeadscopeError(f"text {text!r} has fewer than 2 tokens; sink scores need at least 2")
        out.append(ids)
    return out


def _token_strings(hm: HeadModel, ids: list[int]) -> list[str]:
    if hm.tokenizer is None:
        return [str(i) for i in ids]
    return hm.tokenizer.convert_ids_to_tokens(ids)


# ----------------------------------------------------------------------------------- received sinks
def queries_per_key(n: int, causal: bool) -> torch.Tensor:
    """How many query rows can see key k: n - k under a causal mask, n in an encoder."""
    return (n - torch.arange(n)).float() if causal else torch.full((n,), float(n))


@torch.no_grad()
def sink_alpha(hm: HeadModel, ids: Sequence[int]) -> torch.Tensor:
    """alpha[l, h, k] = mean over the queries that see key k of A[i, k] (Gu et al. 2024); [L, H, N]."""
    x = torch.tensor([list(ids)], device=hm.device)
    with hm.attention_stats(["received"]) as rec:
        hm.model(input_ids=x)
    received = rec.stacked("received")[:, 0].float().cpu()  # [L, H, N]: summed over queries
    return received / queries_per_key(x.shape[1], hm.geometry.causal)


@torch.no_grad()
def sink_mass(hm: HeadModel, ids: Sequence[int], sink_positions: Sequence[int]) -> torch.Tensor:
    """Per head, the attention mass on the given sink tokens averaged over queries: [L, H]."""
    n = len(ids)
    groups = torch.full((n,), -1, dtype=torch.long)
    if len(sink_positions):
        groups[list(sink_positions)] = 0
    x = torch.tensor([list(ids)], device=hm.device)
    with hm.attention_stats(["group_mass"], key_groups=groups, num_groups=1) as rec:
        hm.model(input_ids=x)
    return rec.group_mass()[:, 0, :, :, 0].float().mean(-1).cpu()  # [L, H]


@dataclass
class SinkReport:
    """What :func:`attention_sinks` found. ``table`` has one row per (text, layer, head, sink token)."""

    first_token: HeadScores  # per head: alpha of the first token, mean over texts
    mass_on_sinks: HeadScores  # per head: attention mass on the text's sink tokens, mean over texts
    first_token_share: float  # share of (head, text) pairs whose first token is a sink
    table: pd.DataFrame
    alphas: list[torch.Tensor] = field(default_factory=list)  # [L, H, N] per text

    def sink_tokens_by_layer(self) -> pd.DataFrame:
        """Per (layer, token string): in how many (text, head) pairs that token is a sink."""
        if self.table.empty:
            return pd.DataFrame(columns=["layer", "token", "heads"])
        counts = self.table.groupby(["layer", "token"]).size().rename("heads").reset_index()
        return counts.sort_values(["layer", "heads"], ascending=[True, False]).reset_index(drop=True)


def attention_sinks(hm: HeadModel, texts, eps: float = 0.3, max_tokens: int | None = None) -> SinkReport:
    """Received-attention sinks (Gu et al. 2024): alpha per (layer, head, key), sinks where alpha > eps.

    Encoders (bidirectional) average over all queries; causal models over queries i >= k. The
    per-head mass on sink tokens uses, per text, the union of that text's sink tokens over all
    heads as one key group (a second statistics pass).
    """
    if not 0 < eps < 1:
        raise HeadscopeError(f"eps must lie in (0, 1); got {eps}")
    g = hm.geometry
    first = torch.zeros(g.n_layers, g.n_heads)
    mass = torch.zeros(g.n_layers, g.n_heads)
    rows, alphas = [], []
    sinking = 0.0
    all_ids = encode_texts(hm, texts, max_tokens)
    for t, ids in enumerate(all_ids):
        alpha = sink_alpha(hm, ids)
        alphas.append(alpha)
        first += alpha[..., 0]
        sinking += float((alpha[..., 0] > eps).float().mean())
        is_sink = alpha > eps
        tokens = _token_strings(hm, ids)
        for layer, head, k in is_sink.nonzero().tolist():
            rows.append({"text": t, "layer": layer, "head": head, "position": k, "token": tokens[k],
                         "alpha": float(alpha[layer, head, k])})
        positions = is_sink.any(0).any(0).nonzero().flatten().tolist()
        mass += sink_mass(hm, ids, positions)
    n = len(all_ids)
    params = {"eps": eps, "texts": n, "causal": g.causal}
    table = pd.DataFrame(rows, columns=["text", "layer", "head", "position", "token", "alpha"])
    return SinkReport(
        first_token=HeadScores(first / n, method="sink_first_token", model=hm.name, params=params),
        mass_on_sinks=HeadScores(mass / n, method="sink_mass", model=hm.name, params=params),
        first_token_share=sinking / n,
        table=table,
        alphas=alphas,
    )


# ----------------------------------------------------------------------------------- hidden states
@torch.no_grad()
def hidden_states(hm: HeadModel, ids: Sequence[int], **model_inputs) -> torch.Tensor:
    """output_hidden_states as [L+1, N, d]: index 0 = embeddings = layer 0's residual input.

    ``model_inputs`` go to the model too (e.g. ``pixel_values`` for a LLaVA-style model, whose
    hidden states are the language model's, image tokens included)."""
    x = torch.tensor([list(ids)], device=hm.device)
    out = hm.model(input_ids=x, output_hidden_states=True, **model_inputs)
    return torch.stack(out.hidden_states)[:, 0].float().cpu()


def massive_activations(hm: HeadModel, texts, threshold: float = 100.0, ratio: float = 1000.0,
                        max_tokens: int | None = None) -> pd.DataFrame:
    """Entries with |h| > threshold and > ratio x the median |h| of that hidden state (Sun et al. 2024).

    One row per (text, layer, token, dim); ``layer`` indexes output_hidden_states (0 = embeddings).
    """
    rows = []
    for t, ids in enumerate(encode_texts(hm, texts, max_tokens)):
        states = hidden_states(hm, ids)
        tokens = _token_strings(hm, ids)
        for layer, h in enumerate(states):
            for pos, dim in massive_mask(h, threshold, ratio).nonzero().tolist():
                rows.append({"text": t, "layer": layer, "position": pos, "token": tokens[pos], "dim": dim,
                             "value": float(h[pos, dim])})
    return pd.DataFrame(rows, columns=["text", "layer", "position", "token", "dim", "value"])


def massive_mask(h: torch.Tensor, threshold: float = 100.0, ratio: float = 1000.0) -> torch.Tensor:
    """Bool like ``h`` [N, d]: |h| > threshold and > ratio x the median |h| of that hidden state."""
    mag = h.abs()
    return (mag > threshold) & (mag > ratio * mag.median())


def sink_scores(h: torch.Tensor, dims) -> torch.Tensor:
    """VAR's phi(h) = |h / sqrt(mean(h^2) + 1e-6)|, max over the massive ``dims``: [..., N]."""
    h = h.float()
    phi = (h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).abs()
    return phi[..., list(dims)].max(-1).values


def massive_dims(massive: pd.DataFrame) -> list[int]:
    """The hidden dimensions that carry massive activations (input of the visual-sink test)."""
    return sorted({int(d) for d in massive["dim"]}) if len(massive) else []


def visual_sinks(hm: HeadModel, ids: Sequence[int], dims: Sequence[int], tau: float = 20.0,
                 first_layer: int = 2, **model_inputs) -> dict[int, list[int]]:
    """VAR's sink test (Kang et al. 2025): {layer: sink token positions} for layers >= first_layer.

    phi(h) = |h / sqrt(mean(h^2) + 1e-6)| on the layer's residual input (hidden_states[layer]);
    token j is a sink when max over ``dims`` (from :func:`massive_dims`, never hard-coded) > tau.
    """
    if not len(dims):
        raise HeadscopeError("no massive dims given: run massive_activations first (or lower its thresholds)")
    states = hidden_states(hm, ids, **model_inputs)
    out = {}
    for layer in range(first_layer, hm.geometry.n_layers):
        out[layer] = (sink_scores(states[layer], dims) > tau).nonzero().flatten().tolist()
    return out


def secondary_sinks(hm: HeadModel, texts, cos_threshold: float = 0.9, min_lifetime: int = 4,
                    primary_margin: int = 15, max_tokens: int | None = None) -> pd.DataFrame:
    """Tokens whose hidden state aligns with the first token's (|cos| > 0.9) per layer.

    Lifetime = number of layer outputs (hidden_states[1..L]) where the token is sink-like. Class:
    ``primary`` if lifetime >= max(L - primary_margin, min_lifetime), ``secondary`` if lifetime >=
    min_lifetime [4], else ``noise`` (the paper's L-15 bound falls below 4 for small models, so the
    primary bound is never below the secondary one). The first token itself is left out.
    """
    L = hm.geometry.n_layers
    primary_from = max(L - primary_margin, min_lifetime)
    rows = []
    for t, ids in enumerate(encode_texts(hm, texts, max_tokens)):
        states = hidden_states(hm, ids)[1:]  # [L, N, d] layer outputs
        cos = torch.nn.functional.cosine_similarity(states, states[:, :1], dim=-1)  # [L, N]
        like = cos.abs() > cos_threshold
        tokens = _token_strings(hm, ids)
        for pos in range(1, len(ids)):
            layers = like[:, pos].nonzero().flatten().tolist()
            if not layers:
                continue
            life = len(layers)
            kind = "primary" if life >= primary_from else "secondary" if life >= min_lifetime else "noise"
            rows.append({"text": t, "position": pos, "token": tokens[pos], "lifetime": life,
                         "first_layer": layers[0], "last_layer": layers[-1], "class": kind})
    return pd.DataFrame(rows, columns=["text", "position", "token", "lifetime", "first_layer", "last_layer", "class"])


registry.register(registry.Analyzer("sink_first_token", attention_sinks,
                                    doc="attention sinks by received attention (Gu et al.); also sink_mass"))
