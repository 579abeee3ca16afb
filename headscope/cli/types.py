"""argparse types of the command line (the numeric ones live with the other checks in
headscope.validate: positive_int, finite_float, number_list, ...)."""

from __future__ import annotations

import argparse

from headscope.errors import HeadscopeError
from headscope.heads import Head, parse_heads


def heads(text: str) -> list[Head]:
    """``--heads NAMES``: parsed once, here, into (layer, head) pairs (headscope.heads' parser)."""
    try:
        return parse_heads(text)
    except HeadscopeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
