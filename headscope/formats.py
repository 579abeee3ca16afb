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
from importlib import metadata
from pathlib import Path

import torch
import transformers

from headscope.interventions.kinds.kv_compress import full_heads_from_scores, kv_group_scores
from headscope.io import write_whole
from headscope.provenance import weights_sha256
from headscope.published import DUO_TSV, FORMATS, check_format, published_format, read_file, read_grid, sidecar_of
from headscope.scores import HeadScores

__all__ = ["FORMATS", "DUO_TSV", "published_format", "read_file", "read_scores", "export", "provenance",
           "provenance_of_run", "weights_sha256", "sidecar_of"]


# ------------------------------------------------------------------------------- provenance
def provenance(hm, *, task: str | None = None, prompt_set_sha256: str | None = None, seed: int | None = None) -> dict:
    """What a head-score file was computed with."""
    return {"model": hm.name, "weights_sha256": weights_sha256(hm.model),
            "transformers_version": transformers.__version__, "headscope_version": _headscope_version(),
            "task": task, "prompt_set_sha256": prompt_set_sha256, "seed": seed}


def _headscope_version() -> str:
    """The installed headscope's version (package metadata: the package itself sits above this module)."""
    try:
        return metadata.version("headscope")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


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


# ------------------------------------------------------------------------------- writing
def export(scores: HeadScores, fmt: str, out, *, prov: dict, n_kv_heads: int, rule: str = "mean", sink: int = 4,
           recent: int = 64, top: int = 16, full_share: float | None = None) -> list[Path]:
    """Write ``scores`` in ``fmt`` at ``out`` (duo: a folder); returns the files written."""
    check_format(fmt)
    out = Path(out)
    side = {"format": fmt, "source": {"method": scores.method, "model": scores.model, "params": scores.params,
                                      "shape": [scores.n_layers, scores.n_heads]},
            "provenance": prov}
    if fmt == "duo":
        if scores.n_heads == n_kv_heads:
            kv, how = scores.scores, "the scores are per KV head already"
        else:
            kv, how = kv_group_scores(scores.scores, n_kv_heads, rule), f"{rule} of its {scores.n_heads // n_kv_heads} query heads"
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


def read_scores(path, grid: tuple[int, int] | None = None, n_kv_heads: int | None = None,
                kv_level: bool = False) -> HeadScores:
    """A published file as HeadScores on the model's ``grid`` = (layers, query heads); ``kv_level``:
    [L, H_kv] (for KV compression). See :func:`headscope.published.read_grid` for the shape rules."""
    return HeadScores(*read_grid(path, grid, n_kv_heads, kv_level))
