"""The ``headscope`` command line: ``main`` (parser and error boundary), ``common`` (shared flags,
model loading), ``edit_flags`` (generated from the edit-kind registry), ``registry`` (--task),
``tasks/`` (the --task modules) and ``commands/`` (score, eval, generate, merge, ...)."""

from headscope.cli.main import build_parser, main  # noqa: F401
