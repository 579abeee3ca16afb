"""``mean``: z' = z + s (mean - z), the mean of z over a reference dataset (``source``: token ids;
computed once per model and cached)."""

from __future__ import annotations

from headscope.interventions import registry
from headscope.interventions.edits import source_z, z_hook

KIND = registry.register(registry.EditKind(
    "mean", lambda hm, edit, state, prepared: z_hook(hm, edit, state, prepared), doc=__doc__,
    default_strength=1.0, source="ids", remote=True,
    prepare=lambda hm, edit, pad_id: source_z(hm, "mean", edit.source, pad_id),
))
