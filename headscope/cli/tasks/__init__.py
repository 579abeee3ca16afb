"""The ``--task`` modules of ``headscope score | eval``, one module each; importing this package
registers them (``headscope.cli.registry.task``, which documents what a task module defines)."""

from headscope.cli.tasks import (  # noqa: F401
    circuit,
    classic,
    context_conflict,
    hallucination,
    icl,
    needle,
    pursuit,
    refusal,
    safety,
    sinks,
    vhd,
)
