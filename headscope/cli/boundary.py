"""Last checks of the command line's own inputs that no single option's parser sees: seeds within the
range every random generator takes, and the environment variables headscope reads
(``HEADSCOPE_CPU_KERNEL``), so a bad value is one ``error:`` line before any model loads."""

from __future__ import annotations

import argparse

from headscope_kernels import cpu_tile

from headscope.errors import HeadscopeError

SEED_MAX = 2 ** 63 - 1  # torch.manual_seed and numpy take at most 64 bits; random takes any int


def check(args: argparse.Namespace) -> None:
    """Every ``--*seed`` option within 0..2**63-1, and ``HEADSCOPE_CPU_KERNEL`` one of its spellings."""
    for name, value in sorted(vars(args).items()):
        if name.endswith("seed") and isinstance(value, int) and not 0 <= value <= SEED_MAX:
            flag = "--" + name.replace("_", "-")
            raise HeadscopeError(f"{flag} {value} is out of range; give a seed in 0..{SEED_MAX} (2**63 - 1)")
    try:
        cpu_tile.enabled()
    except ValueError as exc:
        raise HeadscopeError(str(exc)) from None
