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
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from headscope import vision
from headscope.errors import HeadscopeError

DEFAULT_STRENGTH = 2.0  # alpha
DEFAULTS = {"layers": None, "reselect": False, "filter_outliers": True, "squared": False}
# model-call keywords that belong to the call, not to the input (VHD's own forwards rebuild them)
_CALL_KEYS = {"past_key_values", "cache", "cache_position", "position_ids", "use_cache", "return_dict",
              "output_attentions", "output_hidden_states", "logits_to_keep", "inputs_embeds"}


def check(edit) -> None:
    """Validate a vhr edit's options (called by Edit)."""
    unknown = set(edit.options) - set(DEFAULTS)
    if unknown:
        raise HeadscopeError(f"unknown VHR option(s) {sorted(unknown)}; choose from {sorted(DEFAULTS)}")
    if edit.heads:
        raise HeadscopeError("per-input VHR chooses its heads from each input's VHD; give no heads (for fixed heads "
                             "use Edit('scale', heads, strength=alpha))")
    if isinstance(edit.strength, (list, torch.Tensor)) or float(edit.strength) == 0:
        raise HeadscopeError(f"VHR's alpha (strength) must be one finite non-zero number; got {edit.strength!r}")
    if edit.positions != "all" or edit.scope != "both":
        raise HeadscopeError("VHR scales its heads at every position of prefill and decode; leave positions='all', "
                             "scope='both'")
    layers = edit.options.get("layers")
    if layers is not None and not all(isinstance(x, int) for x in layers):
        raise HeadscopeError(f"VHR layers must be layer indices (ints); got {layers!r}")


class _Run:
    """State of one VHR block: the per-row head mask of the latest prefill."""

    def __init__(self, hm, edit):
        from headscope.analyzers.vision import default_layers

        vision.require_vision(hm, "VHR")
        self.hm, self.alpha = hm, float(edit.strength)
        self.opts = {**DEFAULTS, **edit.options}
        g = hm.geometry
        self.layers = default_layers(g.n_layers) if self.opts["layers"] is None else list(self.opts["layers"])
        if not self.layers or not all(0 <= x < g.n_layers for x in self.layers):
            raise HeadscopeError(f"VHR layers must lie in 0..{g.n_layers - 1}; got {self.layers}")
        self.mask: torch.Tensor | None = None  # [B, L, H] bool
        self.inputs: dict | None = None  # the prefill's inputs (reselect)
        self.busy = False  # inside VHD's own forwards: no selection, no edit
        self.selections: list[list[tuple[int, int]]] = []

    def choose(self, inputs: dict) -> None:
        from headscope.analyzers.vision import head_divergence, outlier_filter

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
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        cached = cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0
        if ids is None:
            raise HeadscopeError("VHR needs input_ids (to find the image tokens); the model was called with "
                                 "inputs_embeds only")
        if not cached:
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
def apply(hm, edit, state=None) -> Iterator[_Run]:
    """Install per-input VHR for the block's duration (used by ``intervene``); yields its run state."""
    run = _Run(hm, edit)
    with hm.watch_inputs(run.see_inputs), hm.edit_z(run.edit):
        yield run
