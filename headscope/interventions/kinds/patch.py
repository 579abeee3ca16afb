"""``patch`` (alias ``resample``): z' = z + s (z_source - z), z of another input (``source``: token
ids) at the same positions (activation patching)."""

from __future__ import annotations

from headscope.interventions import registry
from headscope.interventions.edits import source_z, z_hook

KIND = registry.register(registry.EditKind(
    "patch", lambda hm, edit, state, prepared: z_hook(hm, edit, state, prepared), doc=__doc__,
    default_strength=1.0, source="ids", remote=True, aliases=("resample",),
    prepare=lambda hm, edit, pad_id: source_z(hm, "patch", edit.source, pad_id),
))
