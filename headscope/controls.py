"""Random-head controls with intervals: the one place that draws a control N times and says whether
a method's figure lies outside chance.

A claim "X beats random" is made only when X lies outside the 95 % bootstrap interval of the mean
over at least ``MIN_DRAWS`` (20) random draws (the project's standard for every random-head control:
VHR, head pursuit, needle ablation, KV-cache compression). ::

    control = random_control(lambda rng: measure(random_heads(rng)), draws=20, seed=0)
    control.mean["chair_i"], control.interval["chair_i"]      # mean and (low, high)
    control.verdict("chair_i", 0.507, higher_is_better=False)  # 'worse than random' / 'within random' / ...
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from headscope.errors import HeadscopeError

MIN_DRAWS = 20
CONFIDENCE = 0.95


def bootstrap_interval(values, confidence: float = CONFIDENCE, resamples: int = 10_000,
                       seed: int = 0) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of ``values`` (scipy.stats.bootstrap); a
    constant sample gives (v, v)."""
    from scipy.stats import bootstrap

    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or len(x) < 2:
        raise HeadscopeError(f"a bootstrap interval needs at least 2 draws; got {x.size}")
    if not np.isfinite(x).all():
        raise HeadscopeError("a bootstrap interval needs finite values; a draw returned NaN or inf")
    if np.ptp(x) == 0:
        return float(x[0]), float(x[0])
    res = bootstrap((x,), np.mean, confidence_level=confidence, n_resamples=resamples, method="percentile",
                    random_state=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


@dataclass
class Control:
    """Draws of a random control: per metric the values, their mean and 95 % bootstrap interval."""

    draws: list[dict[str, float]]
    seed: int
    mean: dict[str, float] = field(default_factory=dict)
    interval: dict[str, tuple[float, float]] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_draws(cls, draws: list[Mapping[str, float]], seed: int = 0) -> "Control":
        if not draws:
            raise HeadscopeError("a random control needs at least one draw")
        draws = [dict(d) for d in draws]
        out = cls(draws, seed)
        for name in draws[0]:
            values = [d[name] for d in draws]
            out.mean[name] = float(np.mean(values))
            out.std[name] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
            out.interval[name] = bootstrap_interval(values, seed=seed) if len(values) > 1 else (values[0], values[0])
        return out

    @property
    def n(self) -> int:
        return len(self.draws)

    def outside(self, name: str, value: float) -> int:
        """+1 above the interval, -1 below it, 0 inside (or fewer than MIN_DRAWS draws: no claim)."""
        low, high = self.interval[name]
        if self.n < MIN_DRAWS or not math.isfinite(value):
            return 0
        return 1 if value > high else -1 if value < low else 0

    def verdict(self, name: str, value: float, higher_is_better: bool = True) -> str:
        """'beats random', 'worse than random', 'within random', or 'too few draws (N < 20)'."""
        if self.n < MIN_DRAWS:
            return f"too few draws ({self.n} < {MIN_DRAWS}): no claim"
        side = self.outside(name, value)
        if side == 0:
            return "within random"
        return "beats random" if (side > 0) == higher_is_better else "worse than random"

    def cell(self, name: str, digits: int = 3) -> str:
        """'mean [low, high]' for a table."""
        low, high = self.interval[name]
        return f"{self.mean[name]:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"

    def to_dict(self) -> dict:
        return {"draws": self.n, "seed": self.seed, "confidence": CONFIDENCE, "mean": self.mean, "std": self.std,
                "interval": {k: list(v) for k, v in self.interval.items()}, "values": self.draws}


def random_control(measure: Callable[[random.Random], Mapping[str, float]], draws: int = MIN_DRAWS, seed: int = 0,
                   on_draw: Callable[[int, Mapping[str, float]], None] | None = None) -> Control:
    """Run ``measure(rng)`` ``draws`` times with one ``random.Random(seed)`` shared across the draws
    (draw i sees the state left by draws 0..i-1, so a longer run extends a shorter one), and return
    the :class:`Control`: mean and 95 % bootstrap interval of each metric. ``on_draw(i, result)`` is
    called after each draw (e.g. to print it)."""
    if not isinstance(draws, int) or draws < 1:
        raise HeadscopeError(f"draws must be a positive integer (>= {MIN_DRAWS} for a claim); got {draws!r}")
    rng = random.Random(seed)
    results = []
    for i in range(draws):
        result = dict(measure(rng))
        results.append(result)
        if on_draw is not None:
            on_draw(i, result)
    return Control.from_draws(results, seed)
