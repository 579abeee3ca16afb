"""VHR per input, as the paper and its reference do it (He et al. 2025, "Cracking the Code of
Hallucination in LVLMs with Vision-aware Head Divergence"); see docs/METHODS.md, "VHR".

An edit of kind ``"vhr"`` (``Edit("vhr", heads=(), strength=alpha, options={...})``) does, at every
prefill (a model call without a cached prefix whose prompt holds image tokens):

1. VHD of each batch row from that row's own input: the heads' z at the prompt's last token with the
   image and with the image tokens spliced out (:func:`headscope.analyzers.vision.head_divergence`,
   two extra forwards of the unedited model), the outlier filter per layer
   (``filter_outliers`` [True]; :func:`~headscope.analyzers.vision.outlier_filter`).
2. Heads: per chosen layer (``layers`` [None: the last 14/32 of the layers, LLaVA-1.5's share]),
   those strictly above that row's layer median.
3. z of those heads multiplied by alpha [2.0] at all positions, prefill and every decode step, in
   that batch row only; the heads are reused at every decode step of that generation (the
   reference). ``reselect`` [False]: re-choose them before every decode step from the sequence so
   far (the paper's text; two extra forwards of the whole sequence per step).

The heads chosen are recorded (``run.selections``: one list of heads per prompt and choice). The
variant with heads fixed once from a probe set is a plain ``Edit("scale", select_heads(scores))``
(``headscope generate/eval --vhr vhd.csv``); it is not the paper's rule and is labelled as such.

Command line (this kind's flag): ``--vhr per-input`` (this kind, ``--vhr-reselect``, ``--vhr-layers``)
or ``--vhr CSV`` (the fixed-head variant, a ``scale`` edit), both by ``--alpha`` [2.0];
``--random-heads``: as many random heads per layer as VHR selects (the control; eval: ``--draws``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from dataclasses import dataclass, field
from typing import Iterator

import torch

from headscope import vision
from headscope.analyzers.vision import default_layers, head_divergence, outlier_filter, select_heads
from headscope.errors import HeadscopeError
from headscope.heads import same_layer_random_heads
from headscope.hf.inputs import cached_length
from headscope.interventions import registry
from headscope.interventions.edits import Edit
from headscope.interventions.kinds.scale import check_alpha
from headscope.scores import HeadScores, check_ranking
from headscope.validate import number_list

DEFAULT_STRENGTH = 2.0  # alpha
PER_INPUT = "per-input"  # --vhr per-input: this kind; --vhr CSV: the fixed-head variant
# model-call keywords that belong to the call, not to the input (VHD's own forwards rebuild them)
_CALL_KEYS = {"past_key_values", "cache", "cache_position", "position_ids", "use_cache", "return_dict",
              "output_attentions", "output_hidden_states", "logits_to_keep", "inputs_embeds"}


@dataclass(frozen=True)
class VhrOptions:
    """Per-input VHR's options (He et al. 2025's rule by default); checked here, before any model loads."""

    layers: list | None = None  # None: the last 14/32 of the layers (default_layers)
    reselect: bool = field(default=False, metadata={
        "help": "re-choose the heads before every decode step (the paper's text; default: the reference's "
                "heads of the prefill reused)", "needs": "--vhr per-input"})
    filter_outliers: bool = True
    squared: bool = False

    def __post_init__(self):
        if self.layers is not None and (not isinstance(self.layers, (list, tuple)) or not all(
                isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in self.layers)):
            raise HeadscopeError(f"VHR layers must be layer indices (ints); got {self.layers!r}")
        for name in ("reselect", "filter_outliers", "squared"):
            if not isinstance(getattr(self, name), bool):
                raise HeadscopeError(f"VHR option {name} must be true or false; got {getattr(self, name)!r}")

    def check_against(self, shape) -> None:
        """The layers against the model (registry.ModelShape), before its first forward (on a text
        model the edit's apply refuses the model itself)."""
        if not shape.vision:
            return
        if self.layers is not None:
            check_layers(self.layers, shape.n_layers, "VHR option layers")


def check_layers(layers, n_layers: int, what: str) -> list[int]:
    """VHR's layers (option, --vhr-layers): at least one, each within the model's layers."""
    if not layers or not all(0 <= x < n_layers for x in layers):
        raise HeadscopeError(f"{what} must be layers within 0..{n_layers - 1} (this model's); got {list(layers)}")
    return list(layers)


def check(edit) -> None:
    """Rules of a vhr edit beyond its options (called by Edit)."""
    if edit.heads:
        raise HeadscopeError("per-input VHR chooses its heads from each input's VHD; give no heads (for fixed heads "
                             "use Edit('scale', heads, strength=alpha))")
    if isinstance(edit.strength, (list, torch.Tensor)):
        raise HeadscopeError(f"VHR's alpha (strength) must be one number; got {edit.strength!r}")
    check_alpha(float(edit.strength))  # finite, non-zero: the --alpha rule of VHR's fixed-head variant too
    if edit.positions != "all" or edit.scope != "both":
        raise HeadscopeError("VHR scales its heads at every position of prefill and decode; leave positions='all', "
                             "scope='both'")


class _Run:
    """State of one VHR block: the per-row head mask of the latest prefill."""

    def __init__(self, hm, edit):
        vision.require_vision(hm, "VHR")
        self.hm, self.alpha = hm, float(edit.strength)
        self.opts = dataclasses.asdict(edit.config)
        g = hm.geometry
        self.layers = default_layers(g.n_layers) if self.opts["layers"] is None else list(self.opts["layers"])
        check_layers(self.layers, g.n_layers, "VHR option layers")
        self.mask: torch.Tensor | None = None  # [B, L, H] bool
        self.inputs: dict | None = None  # the prefill's inputs (reselect)
        self.busy = False  # inside VHD's own forwards: no selection, no edit
        self.selections: list[list[tuple[int, int]]] = []

    def choose(self, inputs: dict) -> None:
        self.busy = True
        try:
            vhd, txt = head_divergence(self.hm, inputs, squared=self.opts["squared"])  # [B, L, H]
        finally:
            self.busy = False
        chosen = torch.zeros(vhd.shape, dtype=torch.bool)
        for b in range(vhd.shape[0]):
            v = outlier_filter(vhd[b], txt[b]) if self.opts["filter_outliers"] else vhd[b]
            for layer in self.layers:
                chosen[b, layer] = v[layer] > v[layer].median()  # strictly above the layer median
            self.selections.append([tuple(h) for h in chosen[b].nonzero().tolist()])
        self.mask = chosen

    def see_inputs(self, kwargs: dict) -> None:
        if self.busy:
            return
        ids = kwargs.get("input_ids")
        if ids is None:
            raise HeadscopeError("VHR needs input_ids (to find the image tokens); the model was called with "
                                 "inputs_embeds only")
        if cached_length(kwargs) == 0:
            inputs = {k: v for k, v in kwargs.items() if k not in _CALL_KEYS and v is not None}
            if not bool(vision.image_mask(self.hm, ids).any()):
                self.mask, self.inputs = None, None  # a text-only prompt: nothing to choose from
                return
            self.inputs = inputs
            self.choose(inputs)
        elif self.opts["reselect"] and self.inputs is not None:
            # the sequence so far (the cache holds the rest), with this step's token appended
            prev = self.inputs
            grown = torch.cat([prev["input_ids"], ids], dim=1)
            mask = kwargs.get("attention_mask")
            if mask is None or mask.shape[1] != grown.shape[1]:
                mask = torch.cat([prev.get("attention_mask", torch.ones_like(prev["input_ids"])),
                                  torch.ones_like(ids)], dim=1)
            self.inputs = {**prev, "input_ids": grown, "attention_mask": mask}
            self.choose(self.inputs)

    def edit(self, layer: int, z: torch.Tensor, positions: range) -> torch.Tensor:
        if self.busy or self.mask is None or not self.mask[:, layer].any():
            return z
        rows = self.mask[:, layer].to(z.device)  # [B, H]
        if rows.shape[0] != z.shape[0]:
            raise HeadscopeError(f"VHR chose heads for a batch of {rows.shape[0]} and is called on {z.shape[0]} rows; "
                                 "run one generate() per batch inside the block")
        factor = torch.where(rows, torch.tensor(self.alpha, device=z.device), torch.tensor(1.0, device=z.device))
        return z * factor.to(z.dtype).view(z.shape[0], 1, -1, 1)


@contextlib.contextmanager
def apply(hm, edit, state=None, prepared=None) -> Iterator[_Run]:
    """Install per-input VHR for the block's duration (used by ``intervene``); yields its run state."""
    run = _Run(hm, edit)
    with hm.watch_inputs(run.see_inputs), hm.edit_z(run.edit):
        yield run


def per_layer_count_heads(layers, n_heads: int) -> list:
    """A template of VHR's per-layer count: strictly above the (lower) median of n_heads values is
    n_heads // 2 heads in each layer (ties aside), for the random control of per-input VHR."""
    return [(layer, i) for layer in layers for i in range(n_heads // 2)]


def _arguments(parser) -> None:
    parser.add_argument("--vhr-layers", type=number_list(int), default=None,
                        help="with --vhr: comma-separated layers (default: the CSV's, or the last 14/32 per input)")


def _check(args) -> None:
    """--vhr's values before the model loads: the CSV (the fixed-head variant), alpha, --vhr-reselect."""
    check_alpha(args.alpha)
    if args.vhr != PER_INPUT:
        check_ranking(args.vhr, None)
        if args.vhr_reselect:
            raise HeadscopeError("--vhr-reselect needs --vhr per-input")


def _build(args, hm, rng, heads) -> list[Edit]:
    """``--vhr per-input``: this kind; ``--vhr CSV``: the fixed-head variant (a scale edit);
    ``--random-heads``: random heads, VHR's count per layer (a scale edit)."""
    alpha = check_alpha(args.alpha)
    g = hm.geometry
    if args.vhr_layers is not None:
        check_layers(args.vhr_layers, g.n_layers, "--vhr-layers")
    if args.vhr == PER_INPUT:
        vision.require_vision(hm, "--vhr per-input")
        layers = args.vhr_layers if args.vhr_layers is not None else default_layers(g.n_layers)
        if args.random_heads:
            heads = per_layer_count_heads(layers, g.n_heads)
            return [Edit("scale", same_layer_random_heads(heads, g.n_heads, rng or random.Random(args.seed),
                                                          exclude_given=False), strength=alpha)]
        options = {"reselect": bool(args.vhr_reselect)}
        if args.vhr_layers is not None:
            options["layers"] = list(args.vhr_layers)
        return [Edit("vhr", [], strength=alpha, options=options)]
    scores = HeadScores.from_csv(args.vhr, grid=(g.n_layers, g.n_heads), model=hm, force=getattr(args, "force", False))
    heads = hm.check_heads(select_heads(scores, args.vhr_layers))
    if not heads:
        raise HeadscopeError(f"{args.vhr} selects no heads (none above its layer median); check --vhr-layers")
    if args.random_heads:
        heads = same_layer_random_heads(heads, g.n_heads, rng or random.Random(args.seed), exclude_given=False)
    return [Edit("scale", heads, strength=alpha)]


KIND = registry.register(registry.EditKind(
    "vhr", apply, doc=__doc__, options=VhrOptions, label="VHR", default_strength=DEFAULT_STRENGTH, check=check,
    needs_heads=False,
    flags=(registry.CliFlag(
        "vhr", "VHR (He et al. 2025): multiply by --alpha the z of the heads above their layer's median VHD; "
        "'per-input': VHD of each input at prefill, heads reused at every step (the paper's rule); a VHD ranking "
        "CSV: heads fixed once from that probe set (a variant)", _build, takes="file", metavar="per-input|CSV",
        strength="alpha", arguments=_arguments, check=_check, random=True),),
))
