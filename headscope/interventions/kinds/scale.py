"""``scale`` (alias ``reweight``): z' = s z, reweighting a head's output; negative s allowed [2.0].

Command line: ``--scale [CSV]`` (a ranking's --top K heads or the --heads named) and ``--vhr CSV``
(VHR, He et al. 2025: the heads a VHD ranking selects, above their layer's median), both by
``--alpha``; ``--random-heads``: as many random heads per layer as VHR selects (the control).
"""

from __future__ import annotations

import math
import random

from headscope.analyzers.vision import select_heads
from headscope.errors import HeadscopeError
from headscope.heads import same_layer_random_heads
from headscope.scores import check_ranking
from headscope.interventions import registry
from headscope.interventions.edits import Edit, z_hook
from headscope.scores import HeadScores
from headscope.validate import number_list

DEFAULT_ALPHA = 2.0


def check_alpha(alpha: float) -> float:
    if not math.isfinite(alpha) or alpha == 0:
        raise HeadscopeError(f"--alpha must be a finite non-zero factor (VHR's default is 2.0); got {alpha}")
    return alpha


def _build_scale(args, hm, rng, heads) -> list[Edit]:
    return [Edit("scale", heads, strength=args.alpha, scope=getattr(args, "scope", "both"))]


def _vhr_arguments(parser) -> None:
    parser.add_argument("--vhr-layers", type=number_list(int), default=None,
                        help="with --vhr: comma-separated layers (default: the CSV's)")


def _check_vhr(args) -> None:
    check_ranking(args.vhr, None)
    check_alpha(args.alpha)


def _build_vhr(args, hm, rng, heads) -> list[Edit]:
    scores = HeadScores.from_csv(args.vhr, grid=(hm.geometry.n_layers, hm.geometry.n_heads))
    heads = hm.check_heads(select_heads(scores, args.vhr_layers))
    if not heads:
        raise HeadscopeError(f"{args.vhr} selects no heads (none above its layer median); check --vhr-layers")
    if args.random_heads:
        heads = same_layer_random_heads(heads, hm.geometry.n_heads, rng or random.Random(args.seed), exclude_given=False)
    return [Edit("scale", heads, strength=check_alpha(args.alpha))]


KIND = registry.register(registry.EditKind(
    "scale", lambda hm, edit, state, prepared: z_hook(hm, edit, state), doc=__doc__,
    default_strength=DEFAULT_ALPHA, remote=True, aliases=("reweight",),
    flags=(
        registry.CliFlag("scale", "multiply the output of this ranking's top heads (or the --heads named) by --alpha",
                         _build_scale, takes="heads", strength="alpha",
                         describe=lambda args: (f"scaling by {args.alpha:g}", [])),
        registry.CliFlag("vhr", "VHR: multiply the z of the heads this VHD ranking selects (above their layer's "
                         "median in its layers) by --alpha (He et al. 2025)", _build_vhr, takes="file",
                         metavar="CSV", strength="alpha", arguments=_vhr_arguments, check=_check_vhr,
                         random=True),
    ),
))
