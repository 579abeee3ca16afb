"""HeadScores: the one result type, a [layers, heads] score tensor plus what produced it.

Round-trips through CSV (``layer,head,score,rank``, one row per head, best first) and a JSON
sidecar holding the metadata (``ranking.csv`` -> ``ranking.json``).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from headscope.errors import HeadscopeError
from headscope.heads import format_heads

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
        """The k highest-scoring heads as (layer, head), best first."""
        if k < 0 or k > self.n_layers * self.n_heads:
            raise HeadscopeError(f"top-k needs 0 <= k <= {self.n_layers * self.n_heads}; got {k}")
        frame = self.to_frame().head(k)
        return [(int(layer), int(head)) for layer, head in zip(frame["layer"], frame["head"])]

    def above(self, threshold: float) -> list[Head]:
        """Heads whose score exceeds ``threshold``, best first."""
        frame = self.to_frame()
        frame = frame[frame["score"] > threshold]
        return [(int(layer), int(head)) for layer, head in zip(frame["layer"], frame["head"])]

    # ------------------------------------------------------------------ files
    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write the ranking CSV and its JSON sidecar, each written whole (temp file + rename)."""
        path = Path(path)
        meta = {
            "method": self.method,
            "model": self.model,
            "params": self.params,
            "shape": [self.n_layers, self.n_heads],
        }
        _write_whole(path, self.to_frame().to_csv(index=False))
        _write_whole(sidecar_path(path), json.dumps(meta, indent=2, default=_jsonable) + "\n")
        return path

    @classmethod
    def from_csv(cls, path: str | os.PathLike) -> "HeadScores":
        """Read a ranking CSV (columns layer, head, score); metadata from the sidecar if present."""
        path = Path(path)
        if not path.exists():
            raise HeadscopeError(f"ranking file {path} does not exist")
        try:
            frame = pd.read_csv(path)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise HeadscopeError(f"{path} is not a readable CSV ({exc})") from None
        missing = {"layer", "head", "score"} - set(frame.columns)
        if missing:
            raise HeadscopeError(f"{path} lacks column(s) {sorted(missing)}; a ranking CSV needs layer, head, score")
        meta = {}
        if sidecar_path(path).exists():
            meta = json.loads(sidecar_path(path).read_text())
        shape = meta.get("shape") or [int(frame["layer"].max()) + 1, int(frame["head"].max()) + 1]
        scores = torch.full(tuple(shape), float("nan"))
        for layer, head, score in zip(frame["layer"], frame["head"], frame["score"]):
            if not (0 <= layer < shape[0] and 0 <= head < shape[1]):
                raise HeadscopeError(f"{path}: head ({layer}, {head}) lies outside the {shape[0]}x{shape[1]} grid")
            scores[int(layer), int(head)] = float(score)
        return cls(scores, meta.get("method", "unknown"), meta.get("model", ""), meta.get("params", {}))

    # ------------------------------------------------------------------ comparison
    def compare(self, other: "HeadScores", k: int = 10) -> dict[str, float]:
        """Agreement with another ranking: top-k overlap share, top-k Jaccard, Spearman over all heads."""
        from scipy.stats import spearmanr

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
        import plotly.graph_objects as go

        from headscope.plots import Figure

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


def _write_whole(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _jsonable(obj):
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)
