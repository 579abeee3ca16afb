"""``inject``: z' = z + s (m - z) = (1 - s) z + s m, m a given vector per head (``source`` [L, H, d]):
soft injection of a task embedding, s = alpha (Park & Rhee 2025; fitting in
headscope.methods.soft_injection). ``--inject FILE`` on the command line. The task embedding file
(:class:`TaskEmbedding`) is this edit's data: vectors m, learned alphas and what made them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as serialize

from headscope.errors import HeadscopeError
from headscope.interventions import registry
from headscope.interventions.edits import Edit, z_hook
from headscope.scores import HeadScores
from headscope.io import write_whole
from headscope.provenance import check_made_for


@dataclass
class TaskEmbedding:
    """Mean head outputs m [layers, heads, head_dim] of a task, the learned alphas [layers, heads]
    (None until fitted) and what made them (model, task, k, n, template, seed, ...)."""

    vectors: torch.Tensor
    meta: dict = field(default_factory=dict)
    alphas: torch.Tensor | None = None

    def check(self, hm, force: bool = False) -> None:
        """Made for ``hm``: its shape, and the model recorded in its header (weights hash, else name;
        headscope.provenance.check_made_for) unless ``force``."""
        g = hm.geometry
        if tuple(self.vectors.shape) != (g.n_layers, g.n_heads, g.head_dim):
            raise HeadscopeError(
                f"the task embedding was made for {self.meta.get('model', 'another model')} with "
                f"[layers, heads, head_dim] = {list(self.vectors.shape)}; {hm.name} has "
                f"[{g.n_layers}, {g.n_heads}, {g.head_dim}]; fit one for this model (headscope inject fit --model ...)"
            )
        weights = self.meta.get("weights_sha256")
        check_made_for(hm, "the task embedding", str(self.meta.get("model") or ""),
                       weights if isinstance(weights, str) else None, force)

    def edit(self, alphas: torch.Tensor | float | None = None, heads=None) -> Edit:
        """The injection as an :class:`Edit` (last prompt token, prefill only). ``alphas``: [layers,
        heads] (default: the learned ones), or one number for every head; ``heads``: only these
        (alpha = 1 unless given)."""
        L, H = self.vectors.shape[:2]
        if heads is not None:
            heads = [tuple(h) for h in heads]
            strength = 1.0 if alphas is None else alphas
            return Edit("inject", heads, strength, positions="last", scope="prefill", source=self.vectors)
        if alphas is None:
            if self.alphas is None:
                raise HeadscopeError("this task embedding has no learned alphas; fit them (fit_soft_selection) or pass alphas")
            alphas = self.alphas
        if not isinstance(alphas, torch.Tensor):
            alphas = torch.full((L, H), float(alphas))
        all_heads = [(l, h) for l in range(L) for h in range(H)]
        return Edit("inject", all_heads, alphas.reshape(-1), positions="last", scope="prefill", source=self.vectors)

    def scores(self) -> HeadScores:
        """The learned alphas as a HeadScores (rank, export, plot, overlap)."""
        if self.alphas is None:
            raise HeadscopeError("this task embedding has no learned alphas; fit them first")
        params = {k: v for k, v in self.meta.items() if k not in ("model", "weights_sha256")}
        if self.meta.get("weights_sha256"):  # read back by check_scores_for, as a ranking's provenance
            params["provenance"] = {"model": self.meta.get("model", ""), "weights_sha256": self.meta["weights_sha256"]}
        return HeadScores(self.alphas, "soft_injection_alpha", self.meta.get("model", ""), params)

    def save(self, path) -> Path:
        """One safetensors file; the metadata (JSON values) sits in its header. Written whole."""
        path = Path(path)
        tensors = {"vectors": self.vectors.contiguous().float().cpu()}
        if self.alphas is not None:
            tensors["alphas"] = self.alphas.detach().contiguous().float().cpu()
        header = {k: json.dumps(v) for k, v in self.meta.items()}
        return write_whole(path, serialize(tensors, metadata=header))  # bytes: a full disk is an OSError

    @classmethod
    def load(cls, path) -> "TaskEmbedding":
        path = Path(path)
        if not path.is_file():
            raise HeadscopeError(f"task embedding {path} does not exist or is not a file; make one with `headscope inject fit`")
        try:
            path.open("rb").close()  # safetensors reports an unreadable file as "No such file or directory"
        except OSError as exc:
            raise HeadscopeError(f"cannot read task embedding {path}: {exc.strerror}; check its permissions") from None
        try:
            with safe_open(str(path), "pt") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises its own error types
            raise HeadscopeError(f"{path} is not a safetensors task embedding ({exc}); make one with `headscope inject fit`") from None
        if "vectors" not in tensors:
            raise HeadscopeError(f"{path} holds no 'vectors' tensor; make it with `headscope inject fit`")
        vectors, alphas = tensors["vectors"], tensors.get("alphas")
        if vectors.dim() != 3 or (alphas is not None and tuple(alphas.shape) != tuple(vectors.shape[:2])):
            raise HeadscopeError(f"{path}: vectors must be [layers, heads, head_dim] and alphas [layers, heads]; got "
                                 f"{list(vectors.shape)} and {None if alphas is None else list(alphas.shape)}")
        if not all(bool(t.float().isfinite().all()) for t in (vectors, alphas) if t is not None):
            raise HeadscopeError(f"{path} holds NaN or infinite values; fit the embedding again (headscope inject fit)")
        try:
            meta = {k: json.loads(v) for k, v in header.items()}
        except json.JSONDecodeError:
            raise HeadscopeError(f"{path}: its header metadata is not the JSON `headscope inject fit` writes; "
                                 "make the file with `headscope inject fit`") from None
        return cls(vectors, meta, alphas)



def injected_vectors(hm, edit: Edit, pad_id=None) -> dict[int, torch.Tensor]:
    """Per layer the vectors [H, d] an inject edit writes (their shape checked by the registry's
    ``check_against`` before: made for another model is an error there)."""
    return {layer: edit.source[layer].to(hm.device) for layer in range(hm.geometry.n_layers)}


def _check_file(args) -> None:
    TaskEmbedding.load(args.inject)


def _build(args, hm, rng, heads) -> list[Edit]:
    emb = TaskEmbedding.load(args.inject)
    emb.check(hm, force=getattr(args, "force", False))
    return [emb.edit()]


KIND = registry.register(registry.EditKind(
    "inject", lambda hm, edit, state, prepared: z_hook(hm, edit, state, prepared), doc=__doc__,
    default_strength=1.0, source="vectors", remote=True, prepare=injected_vectors,
    flags=(registry.CliFlag("inject", "soft injection: write this task embedding (headscope inject fit) into the "
                            "prompt's last token with its learned alphas (Park & Rhee 2025)", _build,
                            takes="file", metavar="FILE", check=_check_file),),
))
