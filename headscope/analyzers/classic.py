"""Classic head types: previous-token, duplicate-token and induction heads.

Semantics of TransformerLens' ``head_detector.detect_head`` with its default error measure
``"mul"``: per sequence, score = sum(A * D) / sum(A) over the whole [N, N] pattern A of a head,
where D is the 0/1 detection mask (lower-triangular):

- previous-token: D[i, j] = [j == i - 1];
- duplicate-token: D[i, j] = [tok_j == tok_i and j != i], j <= i;
- induction: D[i, j] = [tok_{j-1} == tok_i], 1 <= j <= i (attend to the token after an earlier copy).

``exclude_bos`` zeroes A's column 0 and ``exclude_current_token`` its diagonal before both sums, as
TL does. Scores over several sequences are the mean of the per-sequence scores (TL's list input).

No pattern is built: each mask is a match-id channel of the fused statistics pass
(``attention_stats(["match_mass"], match_ids=...)``: mass of query i on keys j whose key id equals
i's query id), so the scores work at any context length.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch

from headscope.errors import HeadscopeError
from headscope.analyzers import registry
from headscope.model import HeadModel
from headscope.scores import HeadScores

KINDS = ("previous-token", "duplicate-token", "induction")


def repeated_random_tokens(hm: HeadModel, n_sequences: int = 10, half_length: int = 32, seed: int = 0,
                           bos: bool = True) -> torch.Tensor:
    """[n, 2 * half_length (+1)] random token ids repeated twice, after <bos> when the model has one
    (TransformerLens prepends BOS too). Tokens are drawn from the non-special vocabulary."""
    vocab = int(hm.model.config.get_text_config().vocab_size)
    special = set()
    bos_id = None
    if hm.tokenizer is not None:
        special = set(getattr(hm.tokenizer, "all_special_ids", []) or [])
        bos_id = hm.tokenizer.bos_token_id if hm.tokenizer.bos_token_id is not None else hm.tokenizer.cls_token_id
    allowed = torch.tensor([t for t in range(min(vocab, len(hm.tokenizer) if hm.tokenizer is not None else vocab))
                            if t not in special])
    if len(allowed) < 2:
        raise HeadscopeError("the vocabulary has fewer than 2 non-special tokens; cannot draw random sequences")
    g = torch.Generator().manual_seed(seed)
    half = allowed[torch.randint(len(allowed), (n_sequences, half_length), generator=g)]
    seqs = torch.cat([half, half], dim=1)
    if bos and bos_id is not None:
        seqs = torch.cat([torch.full((n_sequences, 1), int(bos_id)), seqs], dim=1)
    return seqs


def match_channels(tokens: torch.Tensor, kind: str, exclude_bos: bool = False,
                   exclude_current_token: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and query match ids [C, B, N] for a detection mask and the TL exclusions.

    Channels: 0 = D (with column 0 removed under exclude_bos), 1 = column 0, 2 = the diagonal,
    3 = D on the diagonal (only induction has one: tok_{i-1} == tok_i).
    """
    if kind not in KINDS:
        raise HeadscopeError(f"unknown head type {kind!r}; choose from {KINDS}")
    B, N = tokens.shape
    pos = torch.arange(N).expand(B, N)
    none = torch.full((B, N), -1, dtype=torch.long)
    tok = tokens.long()
    if kind == "previous-token":
        key, query = pos.clone(), pos - 1
    elif kind == "duplicate-token":  # tok_j == tok_i; the diagonal is subtracted below via channel 2
        key, query = tok.clone(), tok.clone()
    else:
        key = torch.cat([none[:, :1], tok[:, :-1]], dim=1)  # key j carries tok_{j-1}
        query = tok.clone()
    if exclude_bos:
        key[:, 0] = -1
    col0_key = none.clone()
    col0_key[:, 0] = 0
    col0_query = torch.zeros((B, N), dtype=torch.long)
    diag_on_d = none.clone()
    if kind == "induction":
        same = torch.zeros((B, N), dtype=torch.bool)
        same[:, 1:] = tok[:, 1:] == tok[:, :-1]
        diag_on_d = torch.where(same, pos, none)
        if exclude_bos:
            diag_on_d[:, 0] = -1
    keys = torch.stack([key, col0_key, pos.clone(), diag_on_d])
    queries = torch.stack([query, col0_query, pos.clone(), pos.clone()])
    return keys, queries


def tl_score(match_mass: torch.Tensor, kind: str, exclude_bos: bool = False,
             exclude_current_token: bool = False) -> torch.Tensor:
    """Per-sequence TL "mul" score from match masses [..., N, 4] (channels of :func:`match_channels`)."""
    n = match_mass.shape[-2]
    m = match_mass.double().sum(-2)  # [..., 4] summed over query rows
    num = m[..., 0]
    if kind == "duplicate-token":  # D has no diagonal: remove the token's match with itself
        num = num - m[..., 2]
        if exclude_bos:  # column 0 already left channel 0, and with it the cell (0, 0)
            num = num + match_mass[..., 0, 2].double()
    denom = torch.full_like(num, float(n))
    if exclude_bos:
        denom = denom - m[..., 1]
    if exclude_current_token:
        denom = denom - m[..., 2]
        num = num - m[..., 3]
        if exclude_bos:  # the cell (0, 0) was removed twice
            denom = denom + match_mass[..., 0, 2].double()
    return (num / denom).float()


@torch.no_grad()
def head_type_scores(hm: HeadModel, kind: str, tokens: torch.Tensor | Sequence[Sequence[int]] | None = None,
                     exclude_bos: bool = False, exclude_current_token: bool = False,
                     batch_size: int = 8) -> HeadScores:
    """Previous-token / duplicate-token / induction scores with TL head_detector semantics ("mul").

    ``tokens``: [n, N] equal-length sequences (default: repeated random tokens, like TL's demos).
    """
    if kind not in KINDS:
        raise HeadscopeError(f"unknown head type {kind!r}; choose from {KINDS}")
    if not hm.geometry.causal:
        raise HeadscopeError(f"{kind} detection patterns are lower-triangular (TransformerLens semantics) "
                             "and need a causal model; this model is a bidirectional encoder")
    if tokens is None:
        tokens = repeated_random_tokens(hm)
    try:
        tokens = torch.as_tensor(tokens, dtype=torch.long)
    except (ValueError, TypeError):
        raise HeadscopeError("tokens must be equal-length sequences of token ids ([n, N])") from None
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise HeadscopeError(f"tokens must be [n_sequences, N >= 2]; got shape {tuple(tokens.shape)}")
    limit = hm.geometry.max_positions
    if limit is not None and tokens.shape[1] > limit:
        raise HeadscopeError(f"sequences of {tokens.shape[1]} tokens exceed the model's {limit} positions; "
                             f"use shorter ones (e.g. --half-length {(limit - 1) // 2})")
    per_seq = []
    for start in range(0, tokens.shape[0], batch_size):
        batch = tokens[start : start + batch_size]
        keys, queries = match_channels(batch, kind, exclude_bos, exclude_current_token)
        with hm.attention_stats(["match_mass"], match_ids=(keys, queries)) as rec:
            hm.model(input_ids=batch.to(hm.device))
        mass = rec.stacked("match_mass").float().cpu()  # [L, B, H, N, 4]
        per_seq.append(tl_score(mass, kind, exclude_bos, exclude_current_token))  # [L, B, H]
    scores = torch.cat(per_seq, dim=1).mean(1)
    return HeadScores(scores, method=kind, model=hm.name,
                      params={"sequences": int(tokens.shape[0]), "length": int(tokens.shape[1]),
                              "exclude_bos": exclude_bos, "exclude_current_token": exclude_current_token,
                              "error_measure": "mul"})


for _kind, _paper in (("previous-token", "previous-token heads"), ("duplicate-token", "duplicate-token heads"),
                      ("induction", "induction heads (Olsson et al. 2022)")):
    registry.register(registry.Analyzer(_kind, functools.partial(head_type_scores, kind=_kind),
                                        doc=f"{_paper}, TransformerLens head_detector semantics"))
