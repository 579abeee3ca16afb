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

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from headscope.errors import HeadscopeError
from headscope.io import write_whole

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
def as_part(scores, shard: Shard | None, heads=(), **extra):
    """Mark a sweep's result as shard ``shard``'s part (unchanged without a shard): the heads it
    owns plus any tensors the merge needs (``extra``)."""
    if shard is not None:
        scores.shard = shard
        scores.part = {"heads": sorted(heads), **extra}
    return scores


def write_part(scores, path: str | os.PathLike) -> Path:
    """Write a sharded sweep's result (HeadScores with ``shard`` and ``part`` attributes) as one part."""
    shard = getattr(scores, "shard", None)
    if shard is None:
        raise HeadscopeError(f"{scores.method} scores carry no shard; run the sweep with shard=Shard(I, N)")
    data = {"format": PART_FORMAT, "method": scores.method, "model": scores.model, "params": scores.params,
            "shard": (shard.index, shard.count), "scores": scores.scores, **scores.part}
    return write_whole(path, lambda tmp: torch.save(data, tmp))


def _read_part(path) -> dict:
    try:
        data = torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise HeadscopeError(f"part {path} does not exist") from None
    except Exception as exc:
        raise HeadscopeError(f"{path} is not a headscope part ({type(exc).__name__}); write parts with --shard I/N") from None
    if not isinstance(data, dict) or data.get("format") != PART_FORMAT:
        raise HeadscopeError(f"{path} is not a headscope part (format {PART_FORMAT})")
    return data


def merge(paths: Sequence[str | os.PathLike]):
    """Join the parts of one sharded sweep into the HeadScores one unsharded run gives."""
    from headscope.scores import HeadScores

    if not paths:
        raise HeadscopeError("merge needs the part files of one sharded run")
    parts = [_read_part(p) for p in paths]
    first = parts[0]
    for p, data in zip(paths, parts):
        for key in ("method", "model", "params"):
            if data[key] != first[key]:
                raise HeadscopeError(f"{p} comes from another run: its {key} {data[key]!r} differs from "
                                     f"{paths[0]}'s {first[key]!r}")
    count = first["shard"][1]
    indices = sorted(data["shard"][0] for data in parts)
    if any(data["shard"][1] != count for data in parts) or indices != list(range(count)):
        raise HeadscopeError(f"merge needs each of the {count} shards exactly once; got shards "
                             f"{sorted(tuple(d['shard']) for d in parts)}")
    parts.sort(key=lambda data: data["shard"][0])
    joiner = _JOINERS.get(first["method"], _join_heads)
    return joiner(parts, HeadScores)


def _join_heads(parts, HeadScores):
    """Per-head sweeps: each head's value comes from the part that owns it."""
    scores = torch.full_like(parts[0]["scores"], float("nan"))
    for data in parts:
        for layer, head in data["heads"]:
            scores[layer, head] = data["scores"][layer, head]
    first = parts[0]
    return HeadScores(scores, first["method"], first["model"], first["params"])


def _join_ships(parts, HeadScores):
    from headscope.analyzers.safety import ships_result

    per_query = torch.full_like(parts[0]["per_query"], float("nan"))
    for data in parts:
        for layer, head in data["heads"]:
            per_query[:, layer, head] = data["per_query"][:, layer, head]
    first = parts[0]
    return ships_result(per_query, first["model"], first["params"])


def _join_trials(parts, HeadScores):
    from headscope.analyzers.retrieval import retrieval_result

    runs = sorted((batch, k, trial, value) for data in parts for k, (batch, trial, value) in enumerate(data["runs"]))
    first = parts[0]
    return retrieval_result([(trial, value) for _, _, trial, value in runs], first["model"], first["params"])


_JOINERS = {"ships": _join_ships, "retrieval": _join_trials}
