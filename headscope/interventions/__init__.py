"""Interventions at generation time: head edits as data (``edits``), their kinds (``registry``, one
module each in ``kinds``).

    from headscope.interventions import Edit, intervene
    with intervene(hm, [Edit("zero", [(1, 2)])]):
        hm.model.generate(ids)
"""

from headscope.interventions import kinds  # noqa: F401  registers the built-in edit kinds
from headscope.interventions.edits import (  # noqa: F401
    Edit,
    clear_cache,
    edits_from_scores,
    intervene,
    load_edits,
    save_edits,
)
from headscope.interventions.kinds.inject import TaskEmbedding  # noqa: F401
from headscope.interventions.kinds.var import var_edit  # noqa: F401
from headscope.interventions.registry import CliFlag, EditKind, register  # noqa: F401
