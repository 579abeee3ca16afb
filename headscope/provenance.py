"""What a result was made from, and the check that it is used with that model.

One weights hash (:func:`weights_sha256`) identifies a model: rankings (``score --out``: the
sidecar's ``params.provenance``), task embeddings (``inject fit``: the file's header) and shard
parts (their fingerprint) record it, and :func:`check_made_for` refuses to use any of them with a
model whose hash differs, unless ``force`` (``--force`` on the command line). Shard parts also
record a fingerprint of their run (:func:`run_fingerprint`) that ``headscope merge`` compares.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from pathlib import Path

import torch

from headscope.errors import HeadscopeError

_HASHES: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def weights_sha256(model: torch.nn.Module) -> str | None:
    """SHA-256 over the model's parameters and buffers (names, shapes and values, by name).

    Floating-point values are hashed as bfloat16, so one checkpoint loaded in float32, bfloat16 or
    float16 hashes alike (float16 is rounded twice: rarely, a value may differ). Weights offloaded by a
    device map (meta tensors here) are hashed from the model folder's weight files instead, as
    ``files:<sha256>`` (not comparable with the in-memory hash); None when neither is readable.
    Computed once per loaded model (recomputed after any in-place change to its weights).
    """
    state = model.state_dict()
    try:
        version = tuple(t._version for t in state.values())
    except RuntimeError:  # inference tensors keep no version counter: hash every time
        version = None
    cached = _HASHES.get(model)
    if version is not None and cached is not None and cached[0] == version:
        return cached[1]
    digest = hashlib.sha256()
    if any(t.is_meta for t in state.values()):
        folder = Path(str(getattr(getattr(model, "config", None), "_name_or_path", "")))
        files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) if folder.is_dir() else []
        for path in files:
            digest.update(path.name.encode())
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    digest.update(chunk)
        value = f"files:{digest.hexdigest()}" if files else None
    else:
        for name, tensor in sorted(state.items()):
            t = tensor.detach()
            if t.is_floating_point():
                t = t.to(torch.bfloat16)
            t = t.cpu().contiguous()
            digest.update(f"{name}:{tuple(t.shape)}".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        value = digest.hexdigest()
    _HASHES[model] = (version, value)
    return value


def check_made_for(hm, what: str, model: str | None = None, weights: str | None = None, force: bool = False) -> None:
    """Refuse ``what`` (a ranking, task embedding ...) recorded as made for ``model`` with weights hash
    ``weights`` when ``hm`` is another model: the weights hashes differ, or, where no comparable hash
    was recorded, the model names do. ``force``: use it anyway."""
    if force:
        return
    mine = weights_sha256(hm.model) if weights else None
    if weights and mine and weights.startswith("files:") == mine.startswith("files:"):
        if weights == mine:
            return
        raise HeadscopeError(f"{what} was made for {model or 'another model'} (weights {_short(weights)}), not for "
                             f"{hm.name} (weights {_short(mine)}): use one made for this model, or pass --force to "
                             "use it anyway")
    if model and hm.name and model != hm.name:
        raise HeadscopeError(f"{what} was made for {model}, not for {hm.name}: use one made for this model, or pass "
                             "--force to use it anyway")


def check_scores_for(hm, scores, what: str, force: bool = False) -> None:
    """:func:`check_made_for` on a HeadScores read from a file: its ``params.provenance`` (written by
    ``headscope score --out``, ``export`` and ``merge``), else its model name."""
    prov = scores.params.get("provenance") if isinstance(scores.params, dict) else None
    prov = prov if isinstance(prov, dict) else {}
    weights = prov.get("weights_sha256") if isinstance(prov.get("weights_sha256"), str) else None
    check_made_for(hm, what, prov.get("model") or scores.model, weights, force)


def _short(digest: str) -> str:
    return digest[:18] + "..." if len(digest) > 18 else digest


# ------------------------------------------------------------------------------ shard fingerprints
# the score options that do not change a part's result nor its place in the partition: where its
# output goes and what is printed, and where the model runs (the same weights and inputs on another
# device differ by floating-point rounding only)
NOT_FINGERPRINTED = {"command", "out", "show", "shard", "quiet", "device", "device_map", "max_memory",
                     "model", "task", "dtype", "batch_size"}
# fields --force may override in a merge: which model made the part (never how the sweep was split)
MODEL_FIELDS = {"model", "weights_sha256"}


def run_fingerprint(hm, args) -> dict:
    """What determines a ``score --shard I/N`` part's result and its place in the partition: the model
    (name and weights hash), task, dtype, batch size, the number of shards and every task option
    (``--lengths``, ``--needles``, ``--prompts``, ``--seed`` ...), an input file or folder by its content's
    SHA-256."""
    options = {f"--{name.replace('_', '-')}": _option_value(value) for name, value in sorted(vars(args).items())
               if name not in NOT_FINGERPRINTED and value is not None}
    return {"model": hm.name, "weights_sha256": weights_sha256(hm.model), "task": args.task,
            "dtype": str(args.dtype), "batch_size": args.batch_size, "shards": args.shard.count, **options}


def _option_value(value):
    if isinstance(value, str) and value and Path(value).exists():
        return f"sha256:{content_sha256(Path(value))}"
    return json.loads(json.dumps(value, default=str))  # plain lists, numbers and strings (torch.load's weights_only)


def content_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, or of a folder's files (their relative paths and bytes)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()


def fingerprint_difference(a: dict, b: dict) -> tuple[str, object, object] | None:
    """The first field (in sorted order) where two fingerprints differ: (field, a's value, b's value)."""
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            return key, a.get(key), b.get(key)
    return None
