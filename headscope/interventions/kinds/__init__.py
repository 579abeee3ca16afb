"""The built-in edit kinds, one module each; importing this package registers them. The order is
that of their command-line flags and of the edits those flags compose (--ablate, --scale, --vhr,
--var, --inject, --kv-compress)."""

# isort: off
from headscope.interventions.kinds import zero, uniform, query_scale, mean, patch, scale, vhr, var, inject, kv_compress  # noqa: F401
# isort: on
