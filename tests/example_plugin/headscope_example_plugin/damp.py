"""``damp``: z' = factor z on the edited heads (strength s blends: z' = (1 - s + s factor) z), an
example edit kind declared in one module. ``--damp [CSV] --damp-factor F`` on the command line."""

from __future__ import annotations

from dataclasses import dataclass, field

from headscope.errors import HeadscopeError
from headscope.interventions import Edit, registry


@dataclass(frozen=True)
class DampOptions:
    factor: float = field(default=0.5, metadata={"help": "the factor on the heads' output z, in [0, 1]"})

    def __post_init__(self):
        if not 0.0 <= self.factor <= 1.0:
            raise HeadscopeError(f"damp's factor must be in [0, 1]; got {self.factor}")


def _apply(hm, edit, state, prepared):
    layers = {layer for layer, _ in edit.heads}
    factor = edit.config.factor

    def damp(layer, z, positions):
        if layer not in layers:
            return z
        s = edit.strengths(z.device, z.dtype)
        mult = z.new_ones(z.shape[2])
        for (l, h), si in zip(edit.heads, s):
            if l == layer:
                mult[h] = 1 - si + si * factor
        return z * mult.view(1, 1, -1, 1)

    return hm.edit_z(damp)


def _build(args, hm, rng, heads):
    return [Edit("damp", heads, options={"factor": args.damp_factor})]


KIND = registry.register(registry.EditKind(
    "damp", _apply, doc=__doc__, options=DampOptions, default_strength=1.0,
    flags=(registry.CliFlag("damp", "damp the output of this ranking's top heads (or the --heads named) by "
                            "--damp-factor", _build, takes="heads",
                            describe=lambda args: (f"damping by {args.damp_factor:g}", [])),),
))
