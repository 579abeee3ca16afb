"""Sharded head sweeps: ``--shard I/N`` runs part I (0-based) of a sweep, ``headscope merge`` joins the parts.

A sweep (Ships, generalized Ships, activation / path patching over heads; the needle grid over
trials) plans its batches exactly as one unsharded run would. Shard I owns a contiguous block of
the heads (or trial batches) and runs every batch that holds one of them, unchanged, so each value
it keeps is computed by the same operations on the same batch as in the unsharded run. The merge
then replays the unsharded run's final arithmetic (Ships' query counts, the needle grid's running
sum), which makes the merged ranking bit-identical to one unsharded run.

Parts are written whole (temp file + rename): a crashed job leaves no half-written part. Each part
records a fingerprint of its run (``score --shard``: headscope.provenance.run_fingerprint: model and
weights hash, task, every task option and input file's hash, dtype, batch size, shard count); the
merge refuses parts that differ in any of it, in their method or parameters, that repeat a shard or
leave one out, or that claim the same head or trial twice. ``force`` merges parts made with different
models (weights hashes) anyway; how the sweep was split is never overridden.
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
from headscope.provenance import MODEL_FIELDS
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
    fingerprint: dict = field(default_factory=dict)  # what made it (headscope.provenance.run_fingerprint)


def as_part(scores: HeadScores, shard: Shard | None, heads=(), **extra):
    """A sweep's result as shard ``shard``'s :class:`Part` (the HeadScores unchanged without a
    shard): the heads it owns plus any tensors the merge needs (``extra``)."""
    if shard is None:
        return scores
    return Part(scores.method, scores.model, scores.params, shard, scores.scores, sorted(heads), extra)


def write_part(part: Part, path: str | os.PathLike, fingerprint: dict | None = None) -> Path:
    """Write a sharded sweep's :class:`Part`, whole (temp file + rename). ``fingerprint``: what made
    it (plain JSON values; replaces the part's own), compared field by field by :func:`merge`."""
    if not isinstance(part, Part):
        raise HeadscopeError(f"{getattr(part, 'method', type(part).__name__)} is not a shard's part; run the sweep "
                             "with shard=Shard(I, N)")
    data = {"format": PART_FORMAT, "method": part.method, "model": part.model, "params": part.params,
            "shard": (part.shard.index, part.shard.count), "scores": part.scores, "heads": part.heads,
            "fingerprint": part.fingerprint if fingerprint is None else fingerprint, **part.extra}
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
    known = ("format", "method", "model", "params", "shard", "scores", "heads", "fingerprint")
    return Part(data["method"], data["model"], data["params"], Shard(*data["shard"]), data["scores"],
                [tuple(h) for h in data["heads"]], {k: v for k, v in data.items() if k not in known},
                data.get("fingerprint") or {})


def merge(paths: Sequence[str | os.PathLike], force: bool = False) -> HeadScores:
    """Join the parts of one sharded sweep into the HeadScores one unsharded run gives: the
    analyzer's registered ``join``, else each head's value from the part that owns it.

    Parts of another run (any field of :func:`identity` differs), a shard given twice or missing,
    and a head claimed by two parts are errors. ``force``: merge parts made with different models."""
    if not paths:
        raise HeadscopeError("merge needs the part files of one sharded run")
    parts = [_read_part(p) for p in paths]
    first = identity(parts[0])
    for p, part in zip(paths[1:], parts[1:]):
        mine = identity(part)
        for key in list(first) + [k for k in mine if k not in first]:
            if first.get(key) == mine.get(key) or (force and key in MODEL_FIELDS):
                continue
            if key == "model" and first.get("weights_sha256") and first["weights_sha256"] == mine.get("weights_sha256"):
                continue  # one model by two names (an organism's name, its folder)
            fix = ("the parts were made with different models: re-run them with one, or pass --force to merge them "
                   "anyway") if key in MODEL_FIELDS else ("re-run it with the same command as the other parts (only "
                                                          "--shard I/N differs between parts)")
            raise HeadscopeError(f"{p} comes from another run: it differs from {paths[0]} in {_field(key)} "
                                 f"({_shown(mine.get(key))} vs {_shown(first.get(key))}); {fix}")
    count = parts[0].shard.count
    seen: dict[int, str] = {}
    for p, part in zip(paths, parts):
        if part.shard.count != count:
            raise HeadscopeError(f"{p} is shard {part.shard} but {paths[0]} is shard {parts[0].shard}: merge needs "
                                 f"each of the {count} shards exactly once, from one run")
        if part.shard.index in seen:
            raise HeadscopeError(f"{seen[part.shard.index]} and {p} are both shard {part.shard}: merge needs each of "
                                 f"the {count} shards exactly once; give each part once")
        seen[part.shard.index] = str(p)
    missing = [f"{i}/{count}" for i in range(count) if i not in seen]
    if missing:
        raise HeadscopeError(f"merge needs each of the {count} shards exactly once; shard(s) {', '.join(missing)} "
                             "missing: run them (score ... --shard I/N) and pass every part")
    owners: dict = {}
    for p, part in zip(paths, parts):
        for head in part.heads:
            if head in owners:
                raise HeadscopeError(f"{owners[head]} and {p} both scored head {head}: parts of one sweep own disjoint "
                                     "heads; re-run them with the same command (only --shard I/N differs)")
            owners[head] = p
    parts.sort(key=lambda part: part.shard.index)
    analyzer = registry.get(parts[0].method)
    return (analyzer.join if analyzer is not None and analyzer.join else join_heads)(parts)


def identity(part: Part) -> dict:
    """What must be equal in every part of one sweep: the fingerprint's fields (``model``,
    ``weights_sha256``, ``batch_size``, ``--lengths`` ...), the method, and each parameter the sweep
    recorded (``params.trials`` ...; its provenance's model fields count as ``model`` and ``weights_sha256``)."""
    params = dict(part.params)
    prov = params.pop("provenance", None)
    fields = {**part.fingerprint, "method": part.method, "model": part.model}
    if isinstance(prov, dict):
        fields.setdefault("weights_sha256", prov.get("weights_sha256"))
        fields.update({f"provenance.{k}": v for k, v in prov.items() if k not in MODEL_FIELDS})
    fields.update({f"params.{k}": v for k, v in params.items()})
    return fields


FIELD_NAMES = {"provenance.prompt_set_sha256": "provenance.prompt_set_sha256, the hash of the task's options and "
                                               "the contents of its input files (--needles, --haystack, --prompts, "
                                               "...)"}


def _field(key: str) -> str:
    """A differing field as the user knows it (a hash says what it hashes)."""
    return FIELD_NAMES.get(key, key)


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def join_heads(parts: Sequence[Part]) -> HeadScores:
    """Per-head sweeps: each head's value comes from the part that owns it."""
    scores = torch.full_like(parts[0].scores, float("nan"))
    for part in parts:
        for layer, head in part.heads:
            scores[layer, head] = part.scores[layer, head]
    first = parts[0]
    return HeadScores(scores, first.method, first.model, first.params)
