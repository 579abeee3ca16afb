"""Head-score files in the published formats (DuoAttention TSV, Retrieval_Head JSON, QRHead YAML):
which format a path is, and its scores on a model's grid. Writing, provenance and the HeadScores
view are in :mod:`headscope.formats`; :class:`headscope.scores.HeadScores` reads these files
through here, so every command that takes a ranking takes them too.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from headscope.errors import HeadscopeError
from headscope.validate import read_json, read_text

FORMATS = ("duo", "retrieval-head", "qrhead")
DUO_TSV = "full_attention_heads.tsv"
_HEAD = re.compile(r"^\s*(\d+)-(\d+)\s*$")


def sidecar_of(out) -> Path:
    """The provenance sidecar written beside an exported file (``<out>.headscope.json``)."""
    out = Path(out)
    return out.parent / f"{out.name}.headscope.json"


# ------------------------------------------------------------------------------- detection
def published_format(path) -> str | None:
    """Which of FORMATS a path is (by name: a folder holding full_attention_heads.tsv or a .tsv =
    duo, .json = retrieval-head, .yaml/.yml = qrhead), else None (a headscope ranking CSV)."""
    path = Path(path)
    if (path.is_dir() and (path / DUO_TSV).exists()) or path.name.endswith(".tsv"):
        return "duo"
    if path.suffix in (".yaml", ".yml"):
        return "qrhead"
    if path.suffix == ".json" and not path.name.endswith(".headscope.json"):
        return "retrieval-head"
    return None


_NAMED = {"csv": "a headscope ranking CSV (*.csv)", "duo": "a DuoAttention TSV (*.tsv)",
          "retrieval-head": "a Retrieval_Head JSON (*.json)", "qrhead": "a QRHead YAML (*.yaml)"}


def content_format(path) -> str | None:
    """Which head-score format a file's first lines look like ("csv", one of FORMATS, or "sidecar":
    a headscope ranking's metadata), else None."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            head = handle.read(65536)
    except OSError:
        return None  # the reader says what is wrong
    lines = [line.strip() for line in head.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        return None
    if lines[0].startswith("{"):
        return "sidecar" if '"csv_sha256"' in head else "retrieval-head"
    if "attn_head_set:" in head:
        return "qrhead"
    if {"layer", "head", "score"} <= {f.strip().strip('"') for f in lines[0].split(",")}:
        return "csv"
    try:
        if "\t" in lines[0] or len(lines[0].split()) == 1:
            [float(x) for x in lines[0].split("\t")]
            return "duo"
    except ValueError:
        pass
    return None


def check_named(path) -> None:
    """A head-score file whose content is another format than its name says: an error naming the fix."""
    path = Path(path)
    if not path.is_file():
        return
    named, held = published_format(path) or "csv", content_format(path)
    if held == "sidecar":
        raise HeadscopeError(f"{path} is the JSON sidecar of a headscope ranking; pass the ranking itself "
                             f"({path.with_suffix('.csv')})")
    if held is not None and held != named:
        raise HeadscopeError(f"{path} is named like {_NAMED[named]} but holds {_NAMED[held]}; formats are told by "
                             f"the name: rename it to *{_NAMED[held].split('*')[1].rstrip(')')}")


def check_format(name: str) -> str:
    if name not in FORMATS:
        raise HeadscopeError(f"unknown head-score format {name!r}; choose one of {', '.join(FORMATS)}")
    return name


# ------------------------------------------------------------------------------- reading
def _flat_yaml(text: str, path) -> dict:
    """The ``key: value`` lines of a flat YAML file (QRHead's configs), comments skipped."""
    out = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition(":")
        if not sep or line[0].isspace():
            raise HeadscopeError(f"{path}:{lineno} is not a flat 'key: value' line; a QRHead config is flat YAML")
        value = value.strip()
        if value[:1] in "\"'":
            end = value.find(value[0], 1)
            value = value[1:end] if end > 0 else value[1:]
        else:
            value = value.split(" #")[0].strip()
        out[key.strip()] = value
    return out


def _parse_head(text: str, path) -> tuple[int, int]:
    m = _HEAD.match(text)
    if not m:
        raise HeadscopeError(f"{path}: {text!r} is not a head 'LAYER-HEAD' (e.g. 13-18)")
    return int(m.group(1)), int(m.group(2))


def read_file(path) -> tuple[torch.Tensor, str, dict]:
    """(scores [L, X], method, params) of a published file; X = query heads, or KV heads (duo)."""
    path = Path(path)
    check_named(path)
    fmt = published_format(path)
    if fmt == "duo":
        tsv = path / DUO_TSV if path.is_dir() else path
        rows = [line.split("\t") for line in read_text(tsv, "DuoAttention head file").splitlines() if line.strip()]
        if not rows or len({len(r) for r in rows}) != 1:
            raise HeadscopeError(f"{tsv}: a DuoAttention file has L rows of H_kv tab-separated numbers, all rows alike")
        try:
            scores = torch.tensor([[float(x) for x in r] for r in rows])
        except ValueError:
            raise HeadscopeError(f"{tsv}: every field of a DuoAttention file is a number") from None
        params = {"kv_heads": True}
        config = tsv.parent / "config.json"
        if config.exists():
            conf = read_json(config, "DuoAttention config", "it holds sink_size and recent_size")
            params.update({k: conf[k] for k in ("sink_size", "recent_size") if k in conf})
        return scores, "duoattention (full-attention gates per KV head)", params
    if fmt == "retrieval-head":
        data = read_json(path, "Retrieval_Head score file", 'it maps "LAYER-HEAD" to a list of per-trial scores')
        if not isinstance(data, dict) or not data:
            raise HeadscopeError(f'{path}: a Retrieval_Head file is a JSON object {{"LAYER-HEAD": [scores]}}')
        parsed = {}
        for key, values in data.items():
            values = values if isinstance(values, list) else [values]
            if not values or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                raise HeadscopeError(f"{path}: head {key!r} needs a non-empty list of finite scores")
            parsed[_parse_head(key, path)] = sum(values) / len(values)
        shape = (max(k[0] for k in parsed) + 1, max(k[1] for k in parsed) + 1)
        scores = torch.full(shape, float("nan"))
        for (layer, head), value in parsed.items():
            scores[layer, head] = value
        return scores, "retrieval_head (mean over trials)", {"trials_averaged": True}
    if fmt == "qrhead":
        conf = _flat_yaml(read_text(path, "QRHead config"), path)
        if not conf.get("attn_head_set"):
            raise HeadscopeError(f"{path} has no attn_head_set; a QRHead config lists its heads as attn_head_set: \"L-H,...\"")
        heads = [_parse_head(h, path) for h in conf["attn_head_set"].split(",") if h.strip()]
        shape = (max(h[0] for h in heads) + 1, max(h[1] for h in heads) + 1)
        scores = torch.full(shape, float("nan"))
        for rank, (layer, head) in enumerate(heads):
            scores[layer, head] = float(len(heads) - rank)  # best first: higher score
        return scores, "qrhead (listed heads, by rank)", {"listed": len(heads)}
    raise HeadscopeError(f"{path} is not a head-score file of a known format ({', '.join(FORMATS)})")


def read_grid(path, grid: tuple[int, int] | None = None, n_kv_heads: int | None = None,
              kv_level: bool = False) -> tuple[torch.Tensor, str, str, dict]:
    """A published file's (scores, method, model, params) on the model's ``grid`` = (layers, query heads)
    (the arguments of :class:`~headscope.scores.HeadScores`).

    ``kv_level``: return [L, H_kv] (for KV compression) instead of query heads. Shapes are checked:
    a file listing fewer layers / heads than the model is fine (the rest unscored) for the list
    formats, while a DuoAttention array must match exactly."""
    scores, method, params = read_file(path)
    model = ""
    side = sidecar_of(Path(path))
    if side.exists():
        meta = read_json(side, "head-score sidecar", "it is written by headscope export")
        prov = meta.get("provenance") if isinstance(meta, dict) else None
        if isinstance(prov, dict):  # what the file was made from (model, weights hash): checked by its readers
            model, params = str(prov.get("model") or ""), {**params, "provenance": prov}
    if grid is None:
        return scores, method, model, params
    n_layers, n_heads = int(grid[0]), int(grid[1])
    n_kv = n_kv_heads or n_heads
    fl, fh = scores.shape
    want = f"this model has {n_layers} layers x {n_heads} query heads ({n_kv} KV heads)"
    if params.get("kv_heads"):
        if (fl, fh) != (n_layers, n_kv) and not (n_kv_heads is None and fl == n_layers and n_heads % fh == 0):
            raise HeadscopeError(f"{path} holds {fl} layers x {fh} KV heads; {want}")
        if kv_level:
            return scores, method, model, params
        return scores.repeat_interleave(n_heads // fh, dim=1), method, model, params
    if fl > n_layers or fh > n_heads:
        raise HeadscopeError(f"{path} names heads up to layer {fl - 1}, head {fh - 1} ({fl} x {fh}); {want}")
    full = torch.full((n_layers, n_heads), float("nan"))
    full[:fl, :fh] = scores
    return full, method, model, params
