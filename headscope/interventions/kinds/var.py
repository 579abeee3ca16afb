"""VAR, Visual Attention Redistribution (Kang et al. 2025, "See What You Are Told: Visual Attention
Sink in Large Multimodal Models"); see docs/METHODS.md, "VAR".

An edit of kind ``"var"`` (``Edit("var", heads=(), strength=p, options={...})``; no heads = all
heads) does, in every layer from ``first_layer`` [2] on:

1. Sinks, fixed at prefill: token j is a sink when max over the model's massive dims of
   phi(h_j) = |h_j / sqrt(mean(h_j^2) + 1e-6)| > tau, h_j the layer's residual input. The dims come
   from the massive-activation analysis of that model (:func:`var_edit`), never a fixed list. Image
   tokens that pass are visual sinks; text tokens that pass (BOS, when it does) are text sinks. No
   token is a sink by its position.
2. tau [None: scaled to the model's width]: phi <= sqrt(d) (all of h in one dim), so the
   reference's tau = 20, set for LLaVA-1.5-7B (d = 4096), can never fire below d = 400. Unless given,
   tau = 20 * sqrt(d / 4096), the same share of the ceiling sqrt(d) (20 / 64 = 0.3125): 2.5 at
   d = 64, 7.1 at d = 512, 20 at d = 4096 (:func:`default_tau`).
3. Where it acts (``rule`` ["paper"]): only in the layers and batch rows whose prompt has a visual
   sink at that layer. A layer where no prompt of the batch has one runs the stock attention (an
   exact no-op: logits equal bit for bit where no layer has one); a prompt without one, batched with
   one that has, keeps its weights (equal up to float rounding). A run that finds no visual sink at
   all says so once (a warning).
4. Image-centric (head, query) rows: queries after the image at prefill and the new token at each
   decode step, whose attention share on visual sinks within the image is <= rho [0.5] and whose
   total image attention is >= ``min_image_mass`` [0.2].
5. On those rows every sink's weight (text sinks too) is multiplied by p [0.6]; the freed mass goes
   to the non-sink image tokens in proportion to their weights (rows still sum to 1). A row with no
   non-sink image token is left unchanged (the reference divides by zero there).

``rule="first-token"``: headscope's former rule, a named deviation. The first real token (BOS) is
a text sink by position (unless it is an image token) and every layer from ``first_layer`` on is
edited, visual sink or not, so VAR moves mass off BOS even in a model without visual sinks.

A decode step or a short prompt (at most DENSE_SCORES scores) builds its rows' pattern outright
and reads the masses in one matmul; a long prefill streams the rows after the image through the
fused kernel (``reweight=(sinks, non-sink image, p)``): no [H, N, N] pattern. Unlike the reference
it also runs in the last layer (its exclusion never runs there) and handles batches with left
padding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple

import torch
from PIL import Image
from headscope_kernels import attention_with_stats

from headscope import vision
from headscope.analyzers.sinks import massive_mask, sink_scores
from headscope.cache import attention_pattern
from headscope.errors import HeadscopeError
from headscope.heads import head_masks
from headscope.hf.attention import kernel_arguments, stock_attention
from headscope.hf.inputs import cached_length
from headscope.interventions import registry
from headscope.interventions.edits import Edit

DEFAULT_STRENGTH = 0.6  # p
RULES = ("paper", "first-token")
REFERENCE_TAU, REFERENCE_WIDTH = 20.0, 4096  # the reference's tau, for LLaVA-1.5-7B's d_model


def default_tau(d_model: int) -> float:
    """tau scaled to the model's width: 20 * sqrt(d / 4096), the reference's share of phi's ceiling
    sqrt(d) (phi <= sqrt(d), so tau = 20 cannot fire below d = 400)."""
    return REFERENCE_TAU * math.sqrt(d_model / REFERENCE_WIDTH)


def _finite(name: str, value, lo: float = -math.inf, hi: float = math.inf) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not lo <= value <= hi:
        where = "" if (lo, hi) == (-math.inf, math.inf) else f" in [{lo:g}, {hi:g}]"
        raise HeadscopeError(f"VAR option {name} must be a finite number{where}; got {value!r}")


@dataclass(frozen=True)
class VarOptions:
    """VAR's options (Kang et al. 2025's defaults; tau scaled to the model's width unless given);
    ranges checked here, before any model loads."""

    dims: list = field(default_factory=list)  # massive dims of the model (massive_dims), never a fixed list
    tau: float | None = field(default=None, metadata={
        "help": "visual-sink threshold on phi (default: 20 * sqrt(d_model / 4096), the reference's 20 scaled "
                "to the model's width)", "type": float})
    rho: float = field(default=0.5, metadata={"help": "max sink share of image attention, in [0, 1]"})
    min_image_mass: float = field(default=0.2, metadata={"help": "min image attention of a row, in [0, 1]"})
    first_layer: int = 2
    layers: list | None = None
    rule: str = field(default="paper", metadata={
        "help": "act only where an image token is a visual sink (paper), or also treat the first token as a "
                "sink in every layer (first-token: headscope's former rule)", "choices": RULES})

    def __post_init__(self):
        if self.tau is not None:  # None: scaled to the model's width (default_tau)
            _finite("tau", self.tau)
        _finite("rho", self.rho, 0.0, 1.0)
        _finite("min_image_mass", self.min_image_mass, 0.0, 1.0)
        if self.rule not in RULES:
            raise HeadscopeError(f"VAR rule must be one of {list(RULES)}; got {self.rule!r}")
        if not isinstance(self.dims, (list, tuple)) or not all(isinstance(d, int) and d >= 0 for d in self.dims):
            raise HeadscopeError(f"VAR dims must be hidden-dimension indices (ints); got {self.dims!r}")
        if isinstance(self.first_layer, bool) or not isinstance(self.first_layer, int) or self.first_layer < 0:
            raise HeadscopeError(f"VAR option first_layer must be a layer index >= 0; got {self.first_layer!r}")
        if self.layers is not None and not all(isinstance(l, int) and l >= 0 for l in self.layers):
            raise HeadscopeError(f"VAR option layers must be layer indices (ints); got {self.layers!r}")

    def check_against(self, shape) -> None:
        """The dims and layers against the model (registry.ModelShape), before its first forward (on a text
        model the edit's apply refuses the model itself)."""
        if not shape.vision:
            return
        bad = [d for d in self.dims if d >= shape.d_model]
        if bad:
            raise HeadscopeError(f"VAR option dims: {bad} outside this model's hidden dims 0..{shape.d_model - 1}; "
                                 "find the massive dims of this model (var_edit / massive_dims)")
        if self.layers is None and self.first_layer >= shape.n_layers:
            raise HeadscopeError(f"VAR option first_layer {self.first_layer} is outside this model's layers "
                                 f"0..{shape.n_layers - 1}: VAR would edit no layer")
        bad = [l for l in self.layers or () if l >= shape.n_layers]
        if bad or self.layers == []:
            raise HeadscopeError(f"VAR option layers: {bad or 'an empty list'} not within this model's layers "
                                 f"0..{shape.n_layers - 1}; give layer indices in that range (or leave layers out)")


def check(edit) -> None:
    """Rules of a var edit beyond its options' ranges (called by Edit)."""
    p = edit.strength
    if isinstance(p, torch.Tensor) or isinstance(p, list) or not (0.0 <= float(p) <= 1.0):
        raise HeadscopeError(f"VAR's p (strength) must be one number in [0, 1]; got {p!r}")
    if edit.positions != "all":
        raise HeadscopeError("VAR chooses its own rows (queries after the image); leave positions='all'")


@torch.no_grad()
def massive_dims(hm, batch: dict, threshold: float = 100.0, ratio: float = 1000.0) -> list[int]:
    """Hidden dims carrying massive activations (Sun et al. 2024) in the layers' residual inputs for
    these model inputs: the sink analyzer's criterion, on an image-text batch."""
    out = hm.model(**vision.with_positions(hm, batch), output_hidden_states=True)
    mask = batch.get("attention_mask")
    dims: set[int] = set()
    for h in out.hidden_states[:-1]:
        for b in range(h.shape[0]):
            rows = h[b] if mask is None else h[b][mask[b].bool()]
            dims.update(massive_mask(rows.float(), threshold, ratio).nonzero()[:, 1].tolist())
    return sorted(dims)


def var_edit(hm, batch: dict, p: float = DEFAULT_STRENGTH, *, threshold: float = 100.0, ratio: float = 1000.0,
             heads=(), scope: str = "both", **options):
    """A VAR edit for this model, its massive dims found on ``batch`` (model inputs with images)."""
    vision.require_vision(hm, "VAR")
    dims = massive_dims(hm, batch, threshold, ratio)
    return Edit("var", list(heads), strength=p, scope=scope, options={"dims": dims, **options})


def calibration_inputs(hm) -> dict:
    """A mid-grey image under a bare image prompt: where the massive-activation search for VAR looks
    (massive dims are a property of the model, found on any input; Sun et al. 2024)."""
    return vision.encode(hm, [Image.new("RGB", (224, 224), (128, 128, 128))], [vision.placeholder(hm)])


def _build(args, hm, rng, heads) -> list[Edit]:
    """``--var``: VAR on every head, its massive dims found on :func:`calibration_inputs`."""
    vision.require_vision(hm, "--var")
    options = {f.name: getattr(args, f"var_{f.name}") for f in KIND.cli_options(KIND.flags[0])}
    return [var_edit(hm, calibration_inputs(hm), p=args.var_p, **options)]


class Rule(NamedTuple):
    """Which rows VAR redistributes, and by how much."""

    min_image_mass: float
    rho: float
    p: float


class _Run:
    """State of one VAR block: image positions and per-layer sinks of the latest prefill."""

    def __init__(self, hm, edit):
        self.hm = hm
        self.edit = edit
        self.opts = dataclasses.asdict(edit.config)
        self.rule = Rule(float(self.opts["min_image_mass"]), float(self.opts["rho"]), float(edit.strength))
        g = hm.geometry
        self.tau = default_tau(g.d_model) if self.opts["tau"] is None else float(self.opts["tau"])
        self.paper = self.opts["rule"] == "paper"
        chosen = self.opts["layers"]
        self.layers = set(range(int(self.opts["first_layer"]), g.n_layers) if chosen is None else chosen)
        heads = head_masks(edit.heads, g.n_layers, g.n_heads) if edit.heads else torch.ones(g.n_layers, g.n_heads,
                                                                                            dtype=torch.bool)
        self.heads = heads.view(g.n_layers, 1, g.n_heads, 1)  # per layer: [1, H, 1]
        self.token = vision.require_vision(hm, "VAR")
        self.image = self.real = self.last_image = self.step = None
        self.has_image = False
        self.sinks: dict[int, torch.Tensor] = {}
        self.visual: dict[int, torch.Tensor] = {}  # per layer: [B, 1, 1] batch rows with a visual sink
        self.key_sets: dict[int, torch.Tensor] = {}
        self.moves: dict[int, torch.Tensor] = {}
        self.rows_seen = self.rows_edited = 0
        self.prefills_with_image = self.visual_sink_layers = 0  # over the run: prefills, (prefill, layer) pairs

    # ------------------------------------------------------------------ prefill bookkeeping
    def see_inputs(self, kwargs: dict) -> None:
        ids = kwargs.get("input_ids")
        if cached_length(kwargs) > 0:
            return
        if ids is None:
            raise HeadscopeError("VAR needs input_ids (to find the image tokens); the model was called with "
                                 "inputs_embeds only")
        self.image = ids == self.token
        mask = kwargs.get("attention_mask")
        self.real = torch.ones_like(self.image) if mask is None or mask.dim() != 2 else mask.bool()
        pos = torch.arange(ids.shape[1], device=ids.device)
        self.last_image = torch.where(self.image, pos, torch.full_like(pos, -1)).amax(1)  # [B], -1: no image
        self.has_image = bool((self.last_image >= 0).any())
        self.prefills_with_image += self.has_image
        self.sinks, self.visual, self.key_sets, self.moves, self.step = {}, {}, {}, {}, None

    def see_residual(self, layer: int, hidden: torch.Tensor) -> None:
        if layer not in self.layers or self.image is None or hidden.shape[1] != self.image.shape[1]:
            return
        dims = self.opts["dims"]
        sinks = torch.zeros_like(self.image)
        if dims:
            sinks = sink_scores(hidden, dims) > self.tau
        if not self.paper:  # rule "first-token": the first real token (BOS), unless the prompt starts with the image
            first = self.real.long().argmax(1)
            rows = torch.arange(sinks.shape[0], device=sinks.device)
            sinks[rows, first] |= ~self.image[rows, first]
        sinks &= self.real
        visual = (sinks & self.image).any(1)  # [B]
        self.visual_sink_layers += bool(visual.any())
        if self.paper:
            if not visual.any():
                return  # no visual sink in this layer: stock attention, an exact no-op
            self.visual[layer] = visual.view(-1, 1, 1)
        self.sinks[layer] = sinks
        # Per prefill key, as weights whose attention mass VAR reads in one matmul: sinks (text sinks
        # too), the rest of the image, the image, and (1 - rho) x visual sinks - rho x rest, whose mass
        # is <= 0 exactly when visual sinks hold at most rho of the image mass.
        rest, visual = (self.image & ~sinks).float(), (sinks & self.image).float()
        rho = self.rule.rho
        key_sets = torch.stack([sinks.float(), rest, rest + visual, (1 - rho) * visual - rho * rest], -1)
        self.key_sets[layer] = key_sets.unsqueeze(1)                     # [B, 1, N0, 4]
        self.moves[layer] = key_sets[..., :2].transpose(1, 2).unsqueeze(1)  # [B, 1, 2, N0]: sinks, rest

    # ------------------------------------------------------------------ the attention edit
    def attention(self, layer, module, query, key, value, mask, scaling, **kwargs):
        if layer not in self.sinks or not self.has_image:
            return None
        B, H, n_q, _ = query.shape
        n_k = key.shape[2]
        q_offset = n_k - n_q
        if (self.edit.scope == "prefill" and q_offset > 0) or (self.edit.scope == "decode" and q_offset == 0):
            return None
        dev = query.device
        args = kernel_arguments(module, query, mask, scaling, kwargs)
        dense = B * H * n_q * n_k <= DENSE_SCORES
        # rows to compute: all of them when dense, else from the first image's end on (streamed)
        last_image = self.last_image.to(dev)
        lo = 0 if dense or q_offset > 0 else int(last_image[last_image >= 0].min()) + 1
        if lo >= n_q:
            return None
        if self.step is None or self.step[0] != (n_q, n_k, lo, dev):  # the same for every layer of a forward
            rows = q_offset + lo + torch.arange(n_q - lo, device=dev)  # absolute query positions
            after = (rows.view(1, -1) > last_image.view(-1, 1)) & (last_image.view(-1, 1) >= 0)  # [B, rows]
            self.step = ((n_q, n_k, lo, dev), after.unsqueeze(1), int(after.sum()) * H)
        _, after, n_after = self.step
        eligible = after & self.heads[layer].to(dev)  # [B, H, rows]
        if layer in self.visual:  # rule "paper": only batch rows with a visual sink in this layer
            eligible = eligible & self.visual[layer].to(dev)
        if dense:
            out, chosen = _redistribute_dense(query, key, value, args, self.key_sets[layer].to(dev),
                                              self.moves[layer].to(dev), eligible, self.rule)
        else:
            out, chosen = self._streamed(layer, module, query, key, value, mask, scaling, args, lo, eligible,
                                         kwargs)
        self.rows_seen += n_after
        self.rows_edited += int(chosen.sum())
        return out

    def _streamed(self, layer, module, query, key, value, mask, scaling, args, lo, eligible, kwargs):
        """Rows lo: through the fused kernel; rows before, and rows not chosen, keep the stock output."""
        n_q = query.shape[2]
        if args["attn_mask"] is not None and args["attn_mask"].dim() == 4 and args["attn_mask"].shape[2] == n_q:
            args["attn_mask"] = args["attn_mask"][:, :, lo:]
        edited, chosen = _redistribute_streamed(query[:, :, lo:], key, value, args, self.sinks[layer].to(query.device),
                                                self.image.to(query.device), eligible, self.rule,
                                                key.shape[2] - n_q + lo)
        stock = stock_attention(module, query, key, value, mask, scaling, **kwargs)  # [B, q, H, d]
        kept = torch.where(chosen.transpose(1, 2).unsqueeze(-1), edited.transpose(1, 2).to(stock.dtype), stock[:, lo:])
        return torch.cat([stock[:, :lo], kept], dim=1), chosen


# Up to this many scores (B x H x query rows x keys) the rows' pattern is built outright (a decode
# step, a short prompt); above, the fused kernel streams it, never building [H, N, N].
DENSE_SCORES = 1 << 20


def _image_centric(eligible, image_mass, sink_margin, rest_mass, rule):
    """VAR's rows to redistribute [B, H, rows]: eligible, image mass >= min_image_mass, visual sinks
    holding at most rho of it (``sink_margin`` = (1 - rho) x visual-sink mass - rho x rest <= 0), and
    some non-sink image mass to move weight onto (the guard)."""
    return eligible & (image_mass >= rule.min_image_mass) & (sink_margin <= 0) & (rest_mass > 0)


def _redistribute_dense(query, key, value, args, key_sets, moves, eligible, rule):
    """VAR on every row from the rows' attention pattern (a short context): the output [B, q, H, d]
    and the rows chosen [B, H, q]. ``key_sets``, ``moves``: the layer's key weights (_Run.see_residual)."""
    B, H, n_q, d = query.shape
    hkv, n_k, n0 = key.shape[1], key.shape[2], key_sets.shape[2]
    w = attention_pattern(query, key, **args)  # [B, H, q, Nk] float32
    prefix = w[..., :n0]  # generated tokens (keys past the prefill) are neither image nor sinks
    mass = torch.matmul(prefix, key_sets)  # [B, H, q, 4]
    sink_mass, rest_mass = mass[..., 0], mass[..., 1]
    chosen = _image_centric(eligible, mass[..., 2], mass[..., 3], rest_mass, rule)
    # on chosen rows: sinks' weights times p, the freed mass to the rest of the image in proportion
    cut = chosen * (rule.p - 1)  # p - 1 on chosen rows, else 0
    coef = torch.stack([cut, -cut * sink_mass / rest_mass.clamp_min(1e-30)], -1)
    prefix.addcmul_(prefix, torch.matmul(coef, moves))
    out = torch.matmul(w.view(B, hkv, -1, n_k), value.float()).view(B, H, n_q, -1)  # GQA: heads share a kv head
    return out.transpose(1, 2).to(query.dtype), chosen


def _redistribute_streamed(query, key, value, args, sinks, image, eligible, rule, q_offset):
    """VAR through the fused kernel (``reweight``), no [H, N, N] pattern: the output [B, H, rows, d]
    and the rows chosen [B, H, rows]."""
    n_k = key.shape[2]
    sinks, image = _pad(sinks, n_k), _pad(image, n_k)
    groups = torch.where(sinks, 0, torch.where(image, 1, -1)).long()
    kernel_args = {name: value for name, value in args.items() if name != "scaling"}
    stats = attention_with_stats(query, key, value, args["scaling"], q_offset=q_offset, key_groups=groups,
                                 num_groups=2, outputs=("out", "group_mass", "lse"), reweight=(0, 1, rule.p),
                                 **kernel_args)
    rows = q_offset + torch.arange(query.shape[2], device=query.device)
    visual_sink_mass = _mass_on(query, key, args, stats.lse, sinks & image, rows)
    rest_mass, rho = stats.group_mass[..., 1], rule.rho
    chosen = _image_centric(eligible, rest_mass + visual_sink_mass, (1 - rho) * visual_sink_mass - rho * rest_mass,
                            rest_mass, rule)
    return stats.out, chosen


def _pad(mask: torch.Tensor, n: int) -> torch.Tensor:
    """A prefill [B, N0] mask extended with False to n key positions (generated tokens)."""
    if mask.shape[1] >= n:
        return mask[:, :n]
    return torch.cat([mask, mask.new_zeros(mask.shape[0], n - mask.shape[1])], dim=1)


def _mass_on(query, key, args, lse, keys: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Attention mass [B, H, rows] on the few keys marked in ``keys`` [B, Nk], from their scores and
    the rows' lse (the kernel's log-normaliser): only those keys' scores are computed."""
    B, H, n, d = query.shape
    hkv = key.shape[1]
    count = int(keys.sum(1).max()) if keys.any() else 0
    if count == 0:
        return torch.zeros(B, H, n, device=query.device)
    order = torch.sort(keys.long(), dim=1, descending=True, stable=True).indices[:, :count]  # [B, S]
    valid = torch.gather(keys, 1, order)  # [B, S]
    picked = torch.gather(key, 2, order.view(B, 1, count, 1).expand(B, hkv, count, key.shape[-1]))
    picked = picked[:, torch.arange(H, device=key.device) // (H // hkv)]  # query head -> its kv head
    scores = torch.einsum("bhqd,bhsd->bhqs", query.float(), picked.float()) * args["scaling"]
    if args["softcap"] is not None:
        scores = args["softcap"] * torch.tanh(scores / args["softcap"])
    allowed = valid.view(B, 1, 1, count) & (order.view(B, 1, 1, count) <= rows.view(1, 1, -1, 1))
    finite = torch.isfinite(lse).unsqueeze(-1)
    p = torch.exp(scores - torch.where(finite, lse.unsqueeze(-1), torch.zeros_like(lse.unsqueeze(-1))))
    return torch.where(allowed & finite, p, torch.zeros_like(p)).sum(-1)


@contextlib.contextmanager
def apply(hm, edit, state=None, prepared=None) -> Iterator[_Run]:
    """Install VAR for the block's duration (used by ``intervene``); yields its run state."""
    run = _Run(hm, edit)
    with hm.watch_inputs(run.see_inputs), hm.watch_residual(run.see_residual), hm.edit_attention(run.attention):
        yield run
    if run.paper and run.prefills_with_image and not run.visual_sink_layers:
        dims = run.opts["dims"]
        why = (f"no image token has phi > tau = {run.tau:.3g} on the massive dims {dims}" if dims else
               "the model has no massive-activation dims (the sink analyzer found none)")
        warnings.warn(f"VAR found no visual sink in this run ({why}), so by the paper's rule it changed nothing; "
                      "rule='first-token' (CLI --var-rule first-token) also moves mass off BOS", stacklevel=3)


KIND = registry.register(registry.EditKind(
    "var", apply, doc=__doc__, options=VarOptions, label="VAR", default_strength=DEFAULT_STRENGTH, check=check,
    needs_heads=False,
    flags=(registry.CliFlag("var", "VAR: move attention off sink tokens onto the rest of the image (Kang et al. 2025)",
                            _build, strength="var-p"),),
))
