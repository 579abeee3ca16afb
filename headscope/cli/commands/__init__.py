"""The commands of ``headscope``, one module each, in the order ``headscope --help`` lists them.

A command module defines NAME, HELP, add_arguments(parser) and run(args) -> int; with ``TASK =
True`` it takes ``--task`` (and the options every task has) and its run is ``run(args, task)``.
"""

# isort: off
from headscope.cli.commands import score, eval, models, overlap, generate, inject, merge, export  # noqa: F401
# isort: on

COMMANDS = [score, eval, models, overlap, generate, inject, merge, export]
