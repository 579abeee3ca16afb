"""Edits from command-line flags, shared by ``headscope generate`` and ``headscope eval``.

Every flag turns into :class:`~headscope.interventions.Edit` data (the same data and JSON that
``save_edits`` writes) and all of them reach the model through one ``intervene(hm, edits)``. A new
method adds one :class:`EditFlag` to ``EDIT_FLAGS``; generate and eval need no change::

    --edits FILE          any saved edits (save_edits JSON)
    --vhr per-input       VHR (He et al. 2025): scale each input's own VHD-selected heads by --alpha [2.0]
    --vhr CSV             ... heads fixed once from a probe set's VHD ranking (a variant)
      --random-heads      ... on random heads, the same count per layer (eval: --draws N --seed S)
    --var                 VAR (Kang et al. 2025): redistribute attention off the sinks (--var-p, --var-rho, --var-tau, --var-rule)
    --inject FILE         soft injection (Park & Rhee 2025): a task embedding from `headscope inject fit`
"""

from __future__ import annotations

import argparse
import math
import random
from dataclasses import dataclass
from typing import Callable

from headscope.errors import HeadscopeError
from headscope.validate import number_list


@dataclass(frozen=True)
class EditFlag:
    add: Callable[[argparse.ArgumentParser], None]
    build: Callable  # (args, hm, rng: random.Random | None) -> list[Edit]; [] when the flag is not given
    check: Callable = lambda args: None  # (args) -> None: read and validate its files before the model loads


def _add_file(parser):
    parser.add_argument("--edits", metavar="JSON", help="apply the edits in this file (written by save_edits)")


def _check_file(args):
    from headscope.interventions import load_edits

    if getattr(args, "edits", None):
        load_edits(args.edits)


def _build_file(args, hm, rng):
    from headscope.interventions import load_edits

    return load_edits(args.edits) if getattr(args, "edits", None) else []


PER_INPUT = "per-input"


def _add_vhr(parser):
    parser.add_argument("--vhr", metavar="per-input|CSV",
                        help="VHR (He et al. 2025): multiply by --alpha the z of the heads above their layer's median "
                        "VHD; 'per-input': VHD of each input at prefill, heads reused at every step (the paper's rule); "
                        "a VHD ranking CSV: heads fixed once from that probe set (a variant)")
    parser.add_argument("--vhr-layers", type=number_list(int), default=None,
                        help="with --vhr: comma-separated layers (default: the CSV's, or the last 14/32 per input)")
    parser.add_argument("--vhr-reselect", action="store_true",
                        help="with --vhr per-input: re-choose the heads before every decode step (the paper's text)")
    parser.add_argument("--random-heads", action="store_true",
                        help="with --vhr: random heads instead, the same count per layer (control; eval: --draws)")
    if not any(a.dest == "alpha" for a in parser._actions):
        parser.add_argument("--alpha", type=float, default=2.0, help="with --vhr: the factor on z [2.0]")


def check_alpha(alpha: float) -> float:
    if not math.isfinite(alpha) or alpha == 0:
        raise HeadscopeError(f"--alpha must be a finite non-zero factor (VHR's default is 2.0); got {alpha}")
    return alpha


def _check_vhr(args):
    from headscope.heads import check_ranking

    vhr = getattr(args, "vhr", None)
    if vhr and vhr != PER_INPUT:
        check_ranking(vhr, None)
    elif getattr(args, "random_heads", False) and not vhr:
        raise HeadscopeError("--random-heads needs --vhr per-input or --vhr CSV (it draws as many heads per layer as "
                             "VHR selects)")
    if getattr(args, "vhr_reselect", False) and vhr != PER_INPUT:
        raise HeadscopeError("--vhr-reselect needs --vhr per-input")


def per_layer_count_heads(layers, n_heads: int) -> list:
    """A template of VHR's per-layer count: strictly above the (lower) median of n_heads values is
    n_heads // 2 heads in each layer (ties aside), for the random control of per-input VHR."""
    return [(layer, i) for layer in layers for i in range(n_heads // 2)]


def _build_vhr(args, hm, rng):
    if not getattr(args, "vhr", None):
        return []
    from headscope.analyzers.vision import default_layers, select_heads
    from headscope.heads import same_layer_random_heads
    from headscope.interventions import Edit
    from headscope.scores import HeadScores

    alpha = check_alpha(args.alpha)
    g = hm.geometry
    if args.vhr == PER_INPUT:
        layers = args.vhr_layers if args.vhr_layers is not None else default_layers(g.n_layers)
        if not layers or not all(0 <= x < g.n_layers for x in layers):
            raise HeadscopeError(f"--vhr-layers must lie in 0..{g.n_layers - 1}; got {layers}")
        if args.random_heads:
            heads = per_layer_count_heads(layers, g.n_heads)
            return [Edit("scale", same_layer_random_heads(heads, g.n_heads, rng or random.Random(args.seed),
                                                          exclude_given=False), strength=alpha)]
        options = {"reselect": bool(args.vhr_reselect)}
        if args.vhr_layers is not None:
            options["layers"] = list(args.vhr_layers)
        return [Edit("vhr", [], strength=alpha, options=options)]
    scores = HeadScores.from_csv(args.vhr, grid=(g.n_layers, g.n_heads))
    heads = hm.check_heads(select_heads(scores, args.vhr_layers))
    if not heads:
        raise HeadscopeError(f"{args.vhr} selects no heads (none above its layer median); check --vhr-layers")
    if args.random_heads:
        heads = same_layer_random_heads(heads, g.n_heads, rng or random.Random(args.seed), exclude_given=False)
    return [Edit("scale", heads, strength=alpha)]


def _add_var(parser):
    parser.add_argument("--var", action="store_true",
                        help="VAR: move attention off sink tokens onto the rest of the image (Kang et al. 2025)")
    parser.add_argument("--var-p", type=float, default=0.6, help="with --var: factor on sink weights [0.6]")
    parser.add_argument("--var-rho", type=float, default=0.5, help="with --var: max sink share of image attention [0.5]")
    parser.add_argument("--var-tau", type=float, default=None, help="with --var: visual-sink threshold on phi "
                        "[20 * sqrt(d_model / 4096): the reference's 20 scaled to the model's width]")
    parser.add_argument("--var-rule", choices=("paper", "first-token"), default="paper",
                        help="with --var: act only where an image token is a visual sink [paper], or also treat "
                        "the first token as a sink everywhere (headscope's former rule)")


def _build_var(args, hm, rng):
    if not getattr(args, "var", False):
        return []
    from headscope import vision
    from headscope.interventions.var import var_edit

    vision.require_vision(hm, "--var")
    batch = calibration_inputs(hm)
    return [var_edit(hm, batch, p=args.var_p, rho=args.var_rho, tau=args.var_tau, rule=args.var_rule)]


def calibration_inputs(hm) -> dict:
    """A mid-grey image under a bare image prompt: where the massive-activation search for VAR looks
    (massive dims are a property of the model, found on any input; Sun et al. 2024)."""
    from PIL import Image

    from headscope import vision

    return vision.encode(hm, [Image.new("RGB", (224, 224), (128, 128, 128))], [vision.placeholder(hm)])


def _add_inject(parser):
    parser.add_argument("--inject", metavar="FILE", help="soft injection: write this task embedding (headscope inject "
                        "fit) into the prompt's last token with its learned alphas (Park & Rhee 2025)")


def _check_inject(args):
    from headscope.interventions.soft_injection import TaskEmbedding

    if getattr(args, "inject", None):
        TaskEmbedding.load(args.inject)


def _build_inject(args, hm, rng):
    if not getattr(args, "inject", None):
        return []
    from headscope.interventions.soft_injection import TaskEmbedding

    emb = TaskEmbedding.load(args.inject)
    emb.check(hm)
    return [emb.edit()]


EDIT_FLAGS: list[EditFlag] = [EditFlag(_add_file, _build_file, _check_file), EditFlag(_add_vhr, _build_vhr, _check_vhr),
                              EditFlag(_add_var, _build_var), EditFlag(_add_inject, _build_inject, _check_inject)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for flag in EDIT_FLAGS:
        flag.add(parser)


def check(args) -> None:
    """Every edit flag's input files read and validated (the CLI calls this before loading the model)."""
    for flag in EDIT_FLAGS:
        flag.check(args)


def build_edits(args, hm, rng: random.Random | None = None) -> list:
    """The edits the flags ask for, in flag order (they compose)."""
    edits = []
    for flag in EDIT_FLAGS:
        edits += flag.build(args, hm, rng)
    return edits


def is_random(args) -> bool:
    """Whether the edits are a random control to average over --draws."""
    return bool(getattr(args, "random_heads", False))
