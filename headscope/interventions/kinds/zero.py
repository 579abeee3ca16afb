"""``zero``: z' = (1 - s) z; s = 1 (the default) zeroes the head's output. ``--ablate`` on the command
line (``--ablation uniform``: the ``uniform`` kind instead)."""

from __future__ import annotations

from headscope.interventions import registry
from headscope.interventions.edits import Edit, z_hook


def _arguments(parser) -> None:
    parser.add_argument("--ablation", choices=("zero", "uniform"), default="zero",
                        help="with --ablate: zero the head output, or give it uniform attention")


def _build(args, hm, rng, heads) -> list[Edit]:
    return [Edit(args.ablation, heads, scope=getattr(args, "scope", "both"))]


KIND = registry.register(registry.EditKind(
    "zero", lambda hm, edit, state, prepared: z_hook(hm, edit, state), doc=__doc__, default_strength=1.0,
    remote=True, aliases=("ablate",),
    flags=(registry.CliFlag("ablate", "ablate this ranking's --top K heads (or, without CSV, the --heads named)",
                            _build, takes="heads", arguments=_arguments,
                            describe=lambda args: ("ablating", [args.ablation])),),
))
