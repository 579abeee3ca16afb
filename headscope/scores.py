"""HeadScores: the one result type, a [layers, heads] score tensor plus what produced it.

Round-trips through CSV (``layer,head,score,rank``, one row per head, best first) and a JSON
sidecar holding the metadata (``ranking.csv`` -> ``ranking.json``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from headscope.errors import HeadscopeError
from headscope.heads import EXAMPLES, format_heads, parse_heads
from headscope.io import write_whole
from headscope.plots import Figure
from headscope.provenance import check_scores_for
from headscope.published import check_named, published_format, read_grid
from headscope.validate import check_output, read_json, read_text

Head = tuple[int, int]


@dataclass
class HeadScores:
    """Per-head scores. Higher = more of the property the ``method`` measures."""

    scores: torch.Tensor  # [layers, heads], float
    method: str
    model: str = ""
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.scores = torch.as_tensor(self.scores, dtype=torch.float32).detach().cpu()
        if self.scores.dim() != 2:
            raise HeadscopeError(f"HeadScores needs a [layers, heads] tensor; got shape {tuple(self.scores.shape)}")

    @property
    def n_layers(self) -> int:
        return self.scores.shape[0]

    @property
    def n_heads(self) -> int:
        return self.scores.shape[1]

    # ------------------------------------------------------------------ selection
    def to_frame(self) -> pd.DataFrame:
        """One row per head: layer, head, score, rank (1 = highest), sorted by score descending."""
        layers, heads = np.meshgrid(np.arange(self.n_layers), np.arange(self.n_heads), indexing="ij")
        frame = pd.DataFrame(
            {"layer": layers.ravel(), "head": heads.ravel(), "score": self.scores.numpy().ravel()}
        )
        frame = frame.sort_values(["score", "layer", "head"], ascending=[False, True, True], na_position="last")
        frame["rank"] = np.arange(1, len(frame) + 1)
        return frame.reset_index(drop=True)

    def top(self, k: int) -> list[Head]:
        """The k highest-scoring heads as (layer, head), best first; never an unscored (NaN) head."""
        scored = int((~torch.isnan(self.scores)).sum())
        if k < 0 or k > scored:
            raise HeadscopeError(f"top-k needs 0 <= k <= {scored}: the ranking scores only {scored} heads "
                                 f"(of {self.scores.numel()}); got {k}")
        frame = self.to_frame().head(k)
        return [(int(layer), int(head)) for layer, head in zip(frame["layer"], frame["head"])]

    def above(self, threshold: float) -> list[Head]:
        """Heads whose score exceeds ``threshold``, best first."""
        frame = self.to_frame()
        frame = frame[frame["score"] > threshold]
        return [(int(layer), int(head)) for layer, head in zip(frame["layer"], frame["head"])]

    # ------------------------------------------------------------------ files
    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write the ranking CSV and its JSON sidecar as one unit (each file whole: temp file + rename).

        The sidecar carries the CSV's SHA-256. It is written first, holding also the pair it replaces
        (``previous``: the old sidecar, whose hash names the old CSV), then the CSV, then the sidecar
        again without ``previous``. A run killed at any point leaves a pair that reads as the old
        ranking or the new one (:func:`read_ranking`), never a mix; the next write removes the temp
        files a killed one left.
        """
        path = check_ranking_path(path)
        text = self.to_frame().to_csv(index=False)
        meta = {
            "method": self.method,
            "model": self.model,
            "params": self.params,
            "shape": [self.n_layers, self.n_heads],
            "csv_sha256": hashlib.sha256(text.encode()).hexdigest(),
        }
        side = sidecar_path(path)
        for leftover in (*path.parent.glob(f".{path.name}.*.tmp"), *path.parent.glob(f".{side.name}.*.tmp")):
            leftover.unlink(missing_ok=True)  # a killed write's temp file (headscope.io.write_whole)
        previous = _current_pair(path)
        body = json.dumps(meta, indent=2, default=_jsonable) + "\n"
        if previous is not None:
            write_whole(side, json.dumps({**meta, "previous": previous}, indent=2, default=_jsonable) + "\n")
        else:
            write_whole(side, body)
        write_whole(path, text)
        if previous is not None:
            write_whole(side, body)
        return path

    @classmethod
    def from_csv(cls, path: str | os.PathLike, grid: tuple[int, int] | None = None, *, model=None,
                 force: bool = False) -> "HeadScores":
        """Read a ranking CSV (columns layer, head, score) and its sidecar (see :func:`read_ranking`).

        ``grid`` = (layers, heads) of the model the ranking is for: needed when the CSV has no
        sidecar (the grid is never guessed from the largest indices), checked against it otherwise.
        ``model``: the HeadModel it will be used with; a ranking recorded as made for another model
        (weights hash, else name) is an error unless ``force`` (headscope.provenance.check_scores_for).
        A DuoAttention / Retrieval_Head / QRHead file (:mod:`headscope.published`) reads as well.
        """
        scores = cls._read_csv(path, grid)
        if model is not None:
            check_scores_for(model, scores, f"ranking {path}", force)
        return scores

    @classmethod
    def _read_csv(cls, path, grid) -> "HeadScores":
        if published_format(path):
            return cls(*read_grid(path, grid))
        rows, meta = read_ranking(path)
        shape = meta.get("shape")
        if grid is not None:
            grid = (int(grid[0]), int(grid[1]))
            if shape is not None and tuple(shape) != grid:
                raise HeadscopeError(f"{path} holds a {shape[0]}x{shape[1]} ranking (its sidecar says so); this "
                                     f"model has {grid[0]} layers x {grid[1]} heads: use a ranking of this model")
            shape = grid
        if shape is None:
            raise HeadscopeError(f"{path} has no sidecar {sidecar_path(path).name}, so its layers x heads grid is "
                                 "unknown; write rankings with `headscope score --out` (it writes the sidecar), or "
                                 "pass the model's grid: HeadScores.from_csv(path, grid=(layers, heads)) (eval and "
                                 "generate pass it for you)")
        outside = [(layer, head) for layer, head, _ in rows if not (layer < shape[0] and head < shape[1])]
        if outside:
            raise HeadscopeError(f"{path}: head(s) {outside[:5]} lie outside the {shape[0]}x{shape[1]} grid "
                                 f"(layers 0..{shape[0] - 1}, heads 0..{shape[1] - 1})")
        scores = torch.full(tuple(shape), float("nan"))
        for layer, head, score in rows:
            scores[layer, head] = score
        return cls(scores, meta.get("method", "unknown"), meta.get("model", ""), meta.get("params", {}))

    # ------------------------------------------------------------------ comparison
    def compare(self, other: "HeadScores", k: int = 10) -> dict[str, float]:
        """Agreement with another ranking: top-k overlap share, top-k Jaccard, Spearman over all heads."""
        from scipy.stats import spearmanr  # measured: 1.5 s of import time (load ~9) that only compare() needs

        if self.scores.shape != other.scores.shape:
            raise HeadscopeError(f"cannot compare rankings of shapes {tuple(self.scores.shape)} and {tuple(other.scores.shape)}")
        a, b = set(self.top(k)), set(other.top(k))
        x, y = self.scores.flatten().numpy(), other.scores.flatten().numpy()
        ok = ~(np.isnan(x) | np.isnan(y))
        rho = spearmanr(x[ok], y[ok]).statistic if ok.sum() > 2 else math.nan
        return {
            "k": k,
            "topk_overlap": len(a & b) / k if k else math.nan,
            "jaccard": len(a & b) / len(a | b) if a | b else math.nan,
            "spearman": float(rho),
        }

    # ------------------------------------------------------------------ plots
    def heatmap(self, title: str | None = None):
        """Plotly heatmap of the [layer x head] scores (with a static SVG copy, headscope.plots)."""
        fig = Figure(
            go.Heatmap(
                z=self.scores.numpy(),
                x=list(range(self.n_heads)),
                y=list(range(self.n_layers)),
                colorscale="Viridis",
                colorbar={"title": "score"},
                hovertemplate="layer %{y}, head %{x}<br>score %{z:.4f}<extra></extra>",
            )
        )
        fig.update_layout(
            title=title or f"{self.method} scores: {self.model}",
            xaxis_title="head",
            yaxis_title="layer",
            yaxis={"autorange": "reversed"},
        )
        return fig

    def __repr__(self) -> str:
        best = format_heads(self.top(min(3, self.scores.numel())))
        return f"HeadScores({self.method!r}, model={self.model!r}, {self.n_layers}x{self.n_heads}, top: {best})"


def sidecar_path(csv_path: str | os.PathLike) -> Path:
    return Path(csv_path).with_suffix(".json")


def check_ranking_path(path) -> Path:
    """A ranking CSV path that can be written, and whose sidecar is another file."""
    path = Path(path)
    if sidecar_path(path) == path:
        raise HeadscopeError(f"ranking path {path} would be overwritten by its own sidecar {sidecar_path(path).name}; "
                             "name the ranking *.csv")
    check_output(path, "ranking file")
    check_output(sidecar_path(path), "ranking sidecar")
    return path


_INTEGER = re.compile(r"^[+-]?\d+$")


def read_ranking(path) -> tuple[list[tuple[int, int, float]], dict]:
    """The rows (layer, head, score) of a ranking CSV and its sidecar metadata, validated.

    Layer and head must be integers >= 0 (1.7 is an error, not 1), each head at most once; a
    score is a number, or empty / NaN for an unscored head (never inf), and at least one head is
    scored. The sidecar, if present, is a JSON object whose shape holds every row and whose
    csv_sha256 (written by :meth:`HeadScores.to_csv`) matches the CSV.
    """
    path = Path(path)
    if published_format(path):  # DuoAttention / Retrieval_Head / QRHead files (headscope.published)
        scores = read_grid(path)[0]
        return [(l, h, float(scores[l, h])) for l in range(scores.shape[0]) for h in range(scores.shape[1])], {}
    check_named(path)  # e.g. a Retrieval_Head JSON named .csv: say so, not "lacks columns"
    text = read_text(path, "ranking file")
    lines = text.splitlines()
    reader = csv.reader(lines)
    header = [h.strip() for h in next(reader, [])]
    missing = {"layer", "head", "score"} - set(header)
    if not header:
        raise HeadscopeError(f"ranking file {path} has no rows; a ranking CSV has a header layer,head,score and one row per head")
    if missing:
        raise HeadscopeError(f"{path} lacks column(s) {sorted(missing)}; a ranking CSV needs layer, head, score")
    col = {name: header.index(name) for name in ("layer", "head", "score")}
    rows, seen = [], {}
    for lineno, fields in enumerate(reader, 2):
        if not any(f.strip() for f in fields):
            continue
        if len(fields) != len(header):
            raise HeadscopeError(f"{path}:{lineno} has {len(fields)} fields; the header has {len(header)}")
        layer, head = (_index(fields[col[c]], c, path, lineno) for c in ("layer", "head"))
        if (layer, head) in seen:
            raise HeadscopeError(f"{path} lists head ({layer}, {head}) twice (lines {seen[layer, head]} and {lineno}); "
                                 "keep one row per head")
        seen[layer, head] = lineno
        rows.append((layer, head, _score(fields[col["score"]], path, lineno)))
    if not rows:
        raise HeadscopeError(f"ranking file {path} has no rows; give one row per head: layer,head,score")
    if all(math.isnan(score) for _, _, score in rows):
        raise HeadscopeError(f"ranking file {path} has no scored heads (every score is empty or NaN)")
    meta = _read_sidecar(path, text)
    if "shape" in meta:
        outside = [(l, h) for l, h, _ in rows if not (l < meta["shape"][0] and h < meta["shape"][1])]
        if outside:
            raise HeadscopeError(f"{path}: head(s) {outside[:5]} lie outside the {meta['shape'][0]}x{meta['shape'][1]} "
                                 f"grid its sidecar gives")
    return rows, meta


def _index(text: str, column: str, path, lineno: int) -> int:
    text = text.strip()
    if not _INTEGER.match(text):
        raise HeadscopeError(f"{path}:{lineno}: {column} must be an integer; got {text!r}")
    value = int(text)
    if value < 0:
        raise HeadscopeError(f"{path}:{lineno}: {column} {value} lies outside the grid (indices start at 0)")
    return value


def _score(text: str, path, lineno: int) -> float:
    text = text.strip()
    try:
        value = float(text) if text else math.nan
    except ValueError:
        raise HeadscopeError(f"{path}:{lineno}: score must be a number (or empty for an unscored head); "
                             f"got {text!r}") from None
    if math.isinf(value):
        raise HeadscopeError(f"{path}:{lineno}: score is infinite; give a finite number, or leave it empty")
    return value


def _read_sidecar(path: Path, text: str) -> dict:
    side = sidecar_path(path)
    if not side.exists():
        return {}
    fix = f"rewrite it with the command that made {path.name}, or delete it and pass the model's grid"
    meta = read_json(side, "ranking sidecar", fix)
    if not isinstance(meta, dict):
        raise HeadscopeError(f"ranking sidecar {side} must be a JSON object; got {type(meta).__name__}. {fix}")
    actual, previous = hashlib.sha256(text.encode()).hexdigest(), meta.pop("previous", None)
    if meta.get("csv_sha256") != actual and isinstance(previous, dict) and previous.get("csv_sha256") == actual:
        meta = previous  # a write (HeadScores.to_csv) stopped before the CSV was replaced: the old pair holds
    shape = meta.get("shape")
    if shape is not None and not (isinstance(shape, list) and len(shape) == 2
                                  and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in shape)):
        raise HeadscopeError(f"ranking sidecar {side}: shape must be [layers, heads], two integers >= 1; got {shape!r}")
    for key, kind in (("method", str), ("model", str), ("params", dict), ("csv_sha256", str)):
        if key in meta and not isinstance(meta[key], kind):
            raise HeadscopeError(f"ranking sidecar {side}: {key} must be a {kind.__name__}; got {meta[key]!r}")
    digest = meta.get("csv_sha256")
    if digest is not None and digest != actual:
        raise HeadscopeError(f"ranking sidecar {side} does not match {path.name} (the CSV changed after the sidecar "
                             f"was written, or a run stopped between writing the two); {fix}")
    return meta


def _current_pair(path: Path) -> dict | None:
    """The sidecar metadata of the ranking now at ``path`` (with its CSV's hash), to be kept as the
    ``previous`` pair while a new one replaces it; None when there is no CSV or it does not read."""
    try:
        if not path.is_file():
            return None
        text = read_text(path, "ranking file")
        meta = _read_sidecar(path, text)
    except (OSError, HeadscopeError):
        return None
    return {**meta, "csv_sha256": hashlib.sha256(text.encode()).hexdigest()}


def _jsonable(obj):
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


# ------------------------------------------------------------------------------ heads named on a command line
def select_heads(*, names: str | None = None, ranking: str | None = None, top: int | None = None,
                 option: str = "--ablate", grid: tuple[int, int] | None = None, model=None,
                 force: bool = False) -> tuple[list[Head], str]:
    """The heads a command line names: ``--heads NAMES`` or a ranking CSV's ``--top K`` (read on
    ``grid`` = the model's (layers, heads) when given; made for ``model`` unless ``force``: see
    :meth:`HeadScores.from_csv`).

    Returns the heads and how they were chosen, for the printed line (``the top 3 heads of r.csv``).
    """
    check_selection(names=names, ranking=ranking, top=top, option=option)
    if names:
        return parse_heads(names), "heads"
    return HeadScores.from_csv(ranking, grid=grid, model=model, force=force).top(top), f"the top {top} heads of {ranking}"


def check_selection(*, names: str | None, ranking: str | None, top: int | None, option: str) -> None:
    """Exactly one of ``--heads NAMES`` and ``OPTION CSV --top K``, checked before anything loads:
    names parsed, the ranking CSV validated and holding at least K scored heads."""
    if names and ranking:
        raise HeadscopeError(f"give {option} CSV --top K or --heads NAMES, not both")
    if names:
        if top is not None:
            raise HeadscopeError("--top K picks from a ranking CSV; --heads already names the heads")
        parse_heads(names)
        return
    if not ranking:
        raise HeadscopeError(f"{option} needs a ranking CSV and --top K, or --heads NAMES ({EXAMPLES})")
    if top is None:
        raise HeadscopeError(f"{option} CSV needs --top K (how many of its top heads), or name the heads with --heads")
    check_ranking(ranking, top)


def check_ranking(path: str, top: int | None) -> None:
    """A ranking CSV given on the command line, read and validated before any model is loaded."""
    rows, _ = read_ranking(path)
    scored = sum(not math.isnan(score) for _, _, score in rows)
    if top is not None and top > scored:
        raise HeadscopeError(f"--top {top}: {path} scores only {scored} heads; use --top <= {scored}")
