"""Command-line tasks, one module each, found through these lists.

A task module (``headscope score|eval --task NAME``) defines:

    TASKS: tuple[str, ...]                   names it answers to, e.g. ("needle",)
    DEFAULT_MODEL: str                       model used when --model is not given
    add_arguments(parser, command) -> None   its own options; command is "score" or "eval"
    check(args) -> None                      (optional) read and validate its input files before the
                                             model is loaded (bad input fails in seconds, not after loading)
    score(args, hm) -> HeadScores            (optional) score every head
    evaluate(args, hm) -> dict[str, float]   (optional) the task metric(s); the last one is printed
                                             last, e.g. {"accuracy": 0.93}. Runs inside whatever
                                             intervention the eval flags (--ablate, --random, ...) set up.

A command module (``headscope NAME``) defines NAME, HELP, add_arguments(parser) and run(args) -> int.
"""

TASK_MODULES = [
    "headscope.commands.needle",
    "headscope.commands.safety", "headscope.commands.refusal",
    "headscope.commands.sinks", "headscope.commands.pursuit", "headscope.commands.circuit", "headscope.commands.classic",
    "headscope.commands.context_conflict", "headscope.commands.vhd", "headscope.commands.hallucination",
    "headscope.commands.icl",
]

COMMAND_MODULES: list[str] = [
    "headscope.commands.overlap",
    "headscope.commands.generate",
    "headscope.commands.inject",
    "headscope.commands.merge",
    "headscope.commands.export",
]
