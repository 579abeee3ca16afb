"""``uniform``: q' = (1 - s) q; s = 1 (the default) gives the head uniform attention over the causal
prefix (DeCoRe's masking, Gema et al. 2024). On the command line: ``--ablate --ablation uniform``."""

from __future__ import annotations

from headscope.interventions import registry
from headscope.interventions.edits import query_hook

KIND = registry.register(registry.EditKind(
    "uniform", lambda hm, edit, state, prepared: query_hook(hm, edit, state, lambda s: 1 - s), doc=__doc__,
    default_strength=1.0,
))
