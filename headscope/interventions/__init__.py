"""Interventions at generation time: head edits as data (``edits``) and DeCoRe decoding (``decore``).

    from headscope.interventions import Edit, intervene
    with intervene(hm, [Edit("zero", [(1, 2)])]):
        hm.model.generate(ids)
"""

from headscope.interventions.edits import (  # noqa: F401
    KINDS,
    Edit,
    clear_cache,
    edits_from_scores,
    intervene,
    load_edits,
    save_edits,
)
