"""Timing that survives a shared machine: methods alternate, each runs >= 3 times, and every
figure comes with its best, its median and the 1-minute load average around the runs."""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def summary(runs: list[float]) -> dict:
    """Best and median of the runs (seconds), and the runs themselves."""
    return {"best_s": round(min(runs), 4), "median_s": round(statistics.median(runs), 4),
            "runs_s": [round(t, 4) for t in runs]}


def alternate(fns: dict[str, Callable[[], object]], repeats: int = 3, warmup: bool = True) -> dict:
    """Run the methods in turn (A B C A B C ...) ``repeats`` times; per method best / median / runs,
    plus the load average before and after. ``fns`` return nothing or their own wall time (a child
    process timing itself reports the time of its run, not its start-up)."""
    if repeats < 3:
        raise ValueError("a figure needs at least 3 runs (repeats >= 3)")
    if warmup:
        for fn in fns.values():
            fn()
    load_before = load_average()
    runs: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            reported = fn()
            runs[name].append(reported if isinstance(reported, float) else time.perf_counter() - start)
    return {"methods": {name: summary(times) for name, times in runs.items()},
            "load_1m": [load_before, load_average()], "repeats": repeats}


def ratio(result: dict, method: str, base: str) -> dict:
    """method / base for the best and the median times."""
    a, b = result["methods"][method], result["methods"][base]
    return {"best": round(a["best_s"] / b["best_s"], 3), "median": round(a["median_s"] / b["median_s"], 3)}
