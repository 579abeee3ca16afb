"""``query_scale``: q' = s q; s = eps [1e-4] is the Ships ablation (Zhou et al. 2024)."""

from __future__ import annotations

from headscope.interventions import registry
from headscope.interventions.edits import query_hook

KIND = registry.register(registry.EditKind(
    "query_scale", lambda hm, edit, state, prepared: query_hook(hm, edit, state, lambda s: s), doc=__doc__,
    default_strength=1e-4,
))
