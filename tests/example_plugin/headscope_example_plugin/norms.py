"""``norms``: each head's mean output norm |z| over random token ids, divided by the largest head's:
an example analyzer declared in one module, shardable over heads, with a ``join`` that replays the
normalisation over all heads (``headscope score --task norms --tokens N``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from headscope.analyzers import registry
from headscope.errors import HeadscopeError
from headscope.scores import HeadScores
from headscope.sharding import as_part


@dataclass(frozen=True)
class NormsOptions:
    tokens: int = field(default=16, metadata={"help": "random token ids per row, in [1, 512]"})
    seed: int = field(default=0, metadata={"help": "seed of the token ids"})

    def __post_init__(self):
        if not 1 <= self.tokens <= 512:
            raise HeadscopeError(f"--tokens must be in [1, 512]; got {self.tokens}")


def raw_norms(hm, options: NormsOptions) -> torch.Tensor:
    """[layers, heads]: mean |z| over two rows of random token ids."""
    vocab = hm.model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (2, options.tokens), generator=torch.Generator().manual_seed(options.seed))
    with torch.no_grad(), hm.capture_z() as cap:
        hm.model(input_ids=ids.to(hm.device))
    return torch.stack([cap.z[layer].float().norm(dim=-1).mean((0, 1)).cpu() for layer in range(hm.geometry.n_layers)])


def _normalised(raw: torch.Tensor, model: str, params: dict) -> HeadScores:
    return HeadScores(raw / raw.max(), "norms", model, params)


def score(hm, options: NormsOptions, *, shard=None, progress=True):
    raw = raw_norms(hm, options)
    params = {"tokens": options.tokens, "seed": options.seed}
    if shard is None:
        return _normalised(raw, hm.name, params)
    owned = shard.block(hm.all_heads())
    kept = torch.full_like(raw, float("nan"))
    for layer, head in owned:
        kept[layer, head] = raw[layer, head]
    return as_part(HeadScores(kept, "norms", hm.name, params), shard, owned, raw=kept)


def join(parts) -> HeadScores:
    raw = torch.full_like(parts[0].extra["raw"], float("nan"))
    for part in parts:
        for layer, head in part.heads:
            raw[layer, head] = part.extra["raw"][layer, head]
    return _normalised(raw, parts[0].model, parts[0].params)


ANALYZER = registry.register(registry.Analyzer("norms", score, options=NormsOptions, join=join,
                                               default_model="retrieval", doc=__doc__))
