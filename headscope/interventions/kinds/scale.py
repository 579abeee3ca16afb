"""``scale`` (alias ``reweight``): z' = s z, reweighting a head's output; negative s allowed [2.0].

Command line: ``--scale [CSV]`` (a ranking's --top K heads or the --heads named) by ``--alpha``.
VHR's fixed-head variant (``--vhr CSV``) builds scale edits too; its flag is the ``vhr`` kind's
(headscope.interventions.kinds.vhr).
"""

from __future__ import annotations

import math

from headscope.errors import HeadscopeError
from headscope.interventions import registry
from headscope.interventions.edits import Edit, z_hook

DEFAULT_ALPHA = 2.0


def check_alpha(alpha: float) -> float:
    if not math.isfinite(alpha) or alpha == 0:
        raise HeadscopeError(f"--alpha must be a finite non-zero factor (VHR's default is 2.0); got {alpha}")
    return alpha


def _build_scale(args, hm, rng, heads) -> list[Edit]:
    return [Edit("scale", heads, strength=args.alpha, scope=getattr(args, "scope", "both"))]


KIND = registry.register(registry.EditKind(
    "scale", lambda hm, edit, state, prepared: z_hook(hm, edit, state), doc=__doc__,
    default_strength=DEFAULT_ALPHA, remote=True, aliases=("reweight",),
    flags=(
        registry.CliFlag("scale", "multiply the output of this ranking's top heads (or the --heads named) by --alpha",
                         _build_scale, takes="heads", strength="alpha",
                         describe=lambda args: (f"scaling by {args.alpha:g}", [])),
    ),
))
