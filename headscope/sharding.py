"""Sharded head sweeps: ``--shard I/N`` runs part I (0-based) of a sweep, ``headscope merge`` joins the parts.

A sweep (Ships, generalized Ships, activation / path patching over heads; the needle grid over
trials) plans its batches exactly as one unsharded run would. Shard I owns a contiguous block of
the heads (or trial batches) and runs every batch that holds one of them, unchanged, so each value
it keeps is computed by the same operations on the same batch as in the unsharded run. The merge
then replays the unsharded run's final arithmetic (Ships' query counts, the needle grid's running
sum), which makes the merged ranking bit-identical to one unsharded run.

Parts are written whole (temp file + rename): a crashed job leaves no half-written part.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from headscope.analyzers import registry
from headscope.errors import HeadscopeError
from headscope.io import write_whole
from headscope.scores import HeadScores

PART_FORMAT = "headscope-part/1"


@dataclass(frozen=True)
class Shard:
    index: int  # 0-based, like torchrun's RANK and a SLURM array 0..N-1
    count: int

    @classmethod
    def parse(cls, text: str | None) -> "Shard | None":
        if text is None:
            return None
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
        if not match or not 0 <= int(match[1]) < int(match[2]):
            raise HeadscopeError(f"--shard must be I/N with 0 <= I < N (e.g. 0/4 ... 3/4, SLURM_ARRAY_TASK_ID/N); got {text!r}")
        return cls(int(match[1]), int(match[2]))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def owns(self, position: int, total: int) -> bool:
        """Whether item ``position`` of ``total`` lies in this shard's contiguous block."""
        return position * self.count // max(total, 1) == self.index

    def block(self, items: Sequence) -> list:
        """This shard's contiguous block of ``items``."""
        return [x for i, x in enumerate(items) if self.owns(i, len(items))]


def owned(shard: Shard | None, items: Sequence) -> set:
    """The items a shard keeps (all of them without a shard)."""
    return set(items if shard is None else shard.block(items))


def batches(items: Sequence, size: int, keep: set | None = None) -> list[list]:
    """The batches one unsharded run forms, less those holding none of ``keep`` (a shard's items)."""
    chunks = [list(items[i : i + size]) for i in range(0, len(items), size)]
    return chunks if keep is None else [c for c in chunks if not keep.isdisjoint(c)]


# ------------------------------------------------------------------------------------- parts
@dataclass
class Part:
    """Shard ``shard``'s part of a sweep: its scores (NaN off the shard), the heads it owns, and the
    tensors its analyzer's ``join`` needs to replay the unsharded run (``extra``)."""

    method: str
    model: str
    params: dict
    shard: Shard
    scores: torch.Tensor
    heads: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)


def as_part(scores: HeadScores, shard: Shard | None, heads=(), **extra):
    """A sweep's result as shard ``shard``'s :class:`Part` (the HeadScores unchanged without a
    shard): the heads it owns plus any tensors the merge needs (``extra``)."""
    if shard is None:
        return scores
    return Part(scores.method, scores.model, scores.params, shard, scores.scores, sorted(heads), extra)


def write_part(part: Part, path: str | os.PathLike) -> Path:
    """Write a sharded sweep's :class:`Part`, whole (temp file + rename)."""
    if not isinstance(part, Part):
        raise HeadscopeError(f"{getattr(part, 'method', type(part).__name__)} is not a shard's part; run the sweep "
                             "with shard=Shard(I, N)")
    data = {"format": PART_FORMAT, "method": part.method, "model": part.model, "params": part.params,
            "shard": (part.shard.index, part.shard.count), "scores": part.scores, "heads": part.heads, **part.extra}
    buffer = io.BytesIO()
    torch.save(data, buffer)
    return write_whole(path, buffer.getvalue())  # bytes: a full disk is an OSError, not torch's RuntimeError


def _read_part(path) -> Part:
    try:
        data = torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise HeadscopeError(f"part {path} does not exist") from None
    except Exception as exc:
        raise HeadscopeError(f"{path} is not a headscope part ({type(exc).__name__}); write parts with --shard I/N") from None
    if not isinstance(data, dict) or data.get("format") != PART_FORMAT:
        raise HeadscopeError(f"{path} is not a headscope part (format {PART_FORMAT})")
    known = ("format", "method", "model", "params", "shard", "scores", "heads")
    return Part(data["method"], data["model"], data["params"], Shard(*data["shard"]), data["scores"],
                [tuple(h) for h in data["heads"]], {k: v for k, v in data.items() if k not in known})


def merge(paths: Sequence[str | os.PathLike]) -> HeadScores:
    """Join the parts of one sharded sweep into the HeadScores one unsharded run gives: the
    analyzer's registered ``join``, else each head's value from the part that owns it."""
    if not paths:
        raise HeadscopeError("merge needs the part files of one sharded run")
    parts = [_read_part(p) for p in paths]
    first = parts[0]
    for p, part in zip(paths, parts):
        for key in ("method", "model", "params"):
            if getattr(part, key) != getattr(first, key):
                raise HeadscopeError(f"{p} comes from another run: its {key} {getattr(part, key)!r} differs from "
                                     f"{paths[0]}'s {getattr(first, key)!r}")
    count = first.shard.count
    indices = sorted(part.shard.index for part in parts)
    if any(part.shard.count != count for part in parts) or indices != list(range(count)):
        raise HeadscopeError(f"merge needs each of the {count} shards exactly once; got shards "
                             f"{sorted((p.shard.index, p.shard.count) for p in parts)}")
    parts.sort(key=lambda part: part.shard.index)
    analyzer = registry.get(first.method)
    return (analyzer.join if analyzer is not None and analyzer.join else join_heads)(parts)


def join_heads(parts: Sequence[Part]) -> HeadScores:
    """Per-head sweeps: each head's value comes from the part that owns it."""
    scores = torch.full_like(parts[0].scores, float("nan"))
    for part in parts:
        for layer, head in part.heads:
            scores[layer, head] = part.scores[layer, head]
    first = parts[0]
    return HeadScores(scores, first.method, first.model, first.params)
