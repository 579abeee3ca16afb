"""Head-score files in the formats serving and steering tools read, both ways.

- ``duo``: DuoAttention's (Xiao et al. 2025) ``full_attention_heads.tsv``, L rows x H_kv
  tab-separated floats (its gates; kvpress's DuoAttentionPress reads the same array), and a
  ``config.json`` beside it with ``sink_size`` and ``recent_size``. Written into a folder. headscope
  writes its KV-group scores (the query-to-KV rule in the config's ``headscope`` entry), or with a
  full-head share 1.0 / 0.0 per KV head, which DuoAttention's threshold (0.5) and sparsity
  (quantile) selections both read as the same heads.
- ``retrieval-head``: Retrieval_Head's (Wu et al. 2024) JSON ``{"L-H": [per-trial scores]}`` of
  query heads (HeadKV and DeCoRe read it, averaging the list). headscope keeps one number per head,
  so it writes a one-element list; the format has no room for metadata (readers parse every key).
- ``qrhead``: QRHead's (Zhang et al. 2025) YAML config, ``attn_head_set: "L-H,L-H,..."`` (its top
  heads, 16 by default), best first; provenance as YAML comments.

Every export also writes ``<out>.headscope.json`` (the sidecar): format, query-to-KV rule, the
source ranking's metadata and the provenance (model, weights hash, transformers and headscope
versions, task, prompt-set hash, seed). Reading gives a :class:`HeadScores`; a file whose layer x
head shape does not match the model is a one-line error naming both shapes. A DuoAttention file
holds KV heads: for query-head edits (``--ablate``, ``--decore``) each KV head's score applies to
every query head of its group.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import torch

from headscope.errors import HeadscopeError
from headscope.scores import HeadScores
from headscope.validate import read_json, read_text, write_whole

FORMATS = ("duo", "retrieval-head", "qrhead")
DUO_TSV = "full_attention_heads.tsv"
_HEAD = re.compile(r"^\s*(\d+)-(\d+)\s*$")


# ------------------------------------------------------------------------------- provenance
def weights_sha256(model: torch.nn.Module) -> str | None:
    """SHA-256 over the model's parameters and buffers (names, dtypes, shapes and bytes, by name).
    Weights offloaded by a device map (meta tensors here) are hashed from the model folder's weight
    files instead, as ``files:<sha256>``; None when neither is readable."""
    digest = hashlib.sha256()
    state = model.state_dict()
    if any(t.is_meta for t in state.values()):
        folder = Path(str(getattr(getattr(model, "config", None), "_name_or_path", "")))
        files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) if folder.is_dir() else []
        for path in files:
            digest.update(path.name.encode())
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    digest.update(chunk)
        return f"files:{digest.hexdigest()}" if files else None
    for name, tensor in sorted(state.items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def provenance(hm, *, task: str | None = None, prompt_set_sha256: str | None = None, seed: int | None = None) -> dict:
    """What a head-score file was computed with."""
    import transformers

    import headscope

    return {"model": hm.name, "weights_sha256": weights_sha256(hm.model),
            "transformers_version": transformers.__version__, "headscope_version": headscope.__version__,
            "task": task, "prompt_set_sha256": prompt_set_sha256, "seed": seed}


GENERIC_OPTIONS = {"command", "task", "model", "device", "device_map", "max_memory", "dtype", "batch_size", "quiet",
                   "out", "show", "shard", "seed"}


def provenance_of_run(hm, args) -> dict:
    """Provenance of a ``headscope score`` run: the prompt set is hashed from the task's own options
    (and the contents of any files they name)."""
    names = [k for k in vars(args) if k not in GENERIC_OPTIONS]
    return provenance(hm, task=getattr(args, "task", None), prompt_set_sha256=options_sha256(args, names),
                      seed=getattr(args, "seed", None))


def options_sha256(args, names) -> str:
    """Hash of the task options and input files that define a run's prompt set."""
    parts = {}
    for name in sorted(names):
        value = getattr(args, name, None)
        if isinstance(value, str) and Path(value).is_file():
            value = hashlib.sha256(Path(value).read_bytes()).hexdigest()
        parts[name] = value
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


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


def check_format(name: str) -> str:
    if name not in FORMATS:
        raise HeadscopeError(f"unknown head-score format {name!r}; choose one of {', '.join(FORMATS)}")
    return name


# ------------------------------------------------------------------------------- writing
def sidecar_of(out) -> Path:
    out = Path(out)
    return out.parent / f"{out.name}.headscope.json"


def kv_scores(scores: torch.Tensor, n_kv_heads: int, rule: str) -> torch.Tensor:
    from headscope.methods.kv_compression import kv_group_scores

    return kv_group_scores(scores, n_kv_heads, rule)


def export(scores: HeadScores, fmt: str, out, *, prov: dict, n_kv_heads: int, rule: str = "mean", sink: int = 4,
           recent: int = 64, top: int = 16, full_share: float | None = None) -> list[Path]:
    """Write ``scores`` in ``fmt`` at ``out`` (duo: a folder); returns the files written."""
    check_format(fmt)
    out = Path(out)
    side = {"format": fmt, "source": {"method": scores.method, "model": scores.model, "params": scores.params,
                                      "shape": [scores.n_layers, scores.n_heads]},
            "provenance": prov}
    if fmt == "duo":
        from headscope.methods.kv_compression import full_heads_from_scores

        if scores.n_heads == n_kv_heads:
            kv, how = scores.scores, "the scores are per KV head already"
        else:
            kv, how = kv_scores(scores.scores, n_kv_heads, rule), f"{rule} of its {scores.n_heads // n_kv_heads} query heads"
        if full_share is not None:
            kv = full_heads_from_scores(scores.scores, n_kv_heads, full_share, rule).float()
            how += f"; 1.0 = among the top {full_share:g} of KV heads, 0.0 = streaming"
        kv = torch.nan_to_num(kv, nan=float("-inf"))
        side["kv_rule"] = how
        text = "\n".join("\t".join(f"{float(x):.18e}" for x in row) for row in kv) + "\n"
        config = {"sink_size": sink, "recent_size": recent,
                  "headscope": {"kv_rule": how, "query_heads_per_kv": scores.n_heads // n_kv_heads
                                if scores.n_heads != n_kv_heads else 1, "provenance": prov}}
        files = [out / DUO_TSV, out / "config.json"]
        write_whole(files[0], text)
        write_whole(files[1], json.dumps(config, indent=2, default=str) + "\n")
    elif fmt == "retrieval-head":
        side["kv_rule"] = "query heads (no aggregation)"
        data = {f"{layer}-{head}": [float(scores.scores[layer, head])]
                for layer in range(scores.n_layers) for head in range(scores.n_heads)
                if not math.isnan(float(scores.scores[layer, head]))}
        files = [out]
        write_whole(out, json.dumps(data) + "\n")
    else:
        side["kv_rule"] = "query heads (no aggregation)"
        heads = scores.top(min(top, int((~torch.isnan(scores.scores)).sum())))
        lines = ["# QRHead-style head set written by headscope: top query heads, best first"]
        lines += [f"# {k}: {json.dumps(v, default=str)}" for k, v in prov.items()]
        lines += [f"# method: {json.dumps(scores.method)}", f"model_name_or_path: {json.dumps(prov.get('model'))}",
                  f"model_base_class: {json.dumps(Path(str(prov.get('model'))).name)}",
                  "attn_head_set: \"" + ",".join(f"{layer}-{head}" for layer, head in heads) + "\""]
        files = [out]
        write_whole(out, "\n".join(lines) + "\n")
    side_path = sidecar_of(out)
    write_whole(side_path, json.dumps(side, indent=2, default=str) + "\n")
    return files + [side_path]


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


def read_scores(path, grid: tuple[int, int] | None = None, n_kv_heads: int | None = None,
                kv_level: bool = False) -> HeadScores:
    """A published file as HeadScores on the model's ``grid`` = (layers, query heads).

    ``kv_level``: return [L, H_kv] (for KV compression) instead of query heads. Shapes are checked:
    a file listing fewer layers / heads than the model is fine (the rest unscored) for the list
    formats, while a DuoAttention array must match exactly."""
    scores, method, params = read_file(path)
    model = ""
    side = sidecar_of(Path(path))
    if side.exists():
        meta = read_json(side, "head-score sidecar", "it is written by headscope export")
        model = meta.get("provenance", {}).get("model", "")
    if grid is None:
        return HeadScores(scores, method, model, params)
    n_layers, n_heads = int(grid[0]), int(grid[1])
    n_kv = n_kv_heads or n_heads
    fl, fh = scores.shape
    want = f"this model has {n_layers} layers x {n_heads} query heads ({n_kv} KV heads)"
    if params.get("kv_heads"):
        if (fl, fh) != (n_layers, n_kv) and not (n_kv_heads is None and fl == n_layers and n_heads % fh == 0):
            raise HeadscopeError(f"{path} holds {fl} layers x {fh} KV heads; {want}")
        if kv_level:
            return HeadScores(scores, method, model, params)
        return HeadScores(scores.repeat_interleave(n_heads // fh, dim=1), method, model, params)
    if fl > n_layers or fh > n_heads:
        raise HeadscopeError(f"{path} names heads up to layer {fl - 1}, head {fh - 1} ({fl} x {fh}); {want}")
    full = torch.full((n_layers, n_heads), float("nan"))
    full[:fl, :fh] = scores
    return HeadScores(full, method, model, params)
