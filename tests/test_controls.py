"""Random-head controls (headscope.controls): the bootstrap interval of the mean against its known
behaviour, the 'beats random' rule, and draws that extend reproducibly."""

import random

import numpy as np
import pytest

from headscope.controls import MIN_DRAWS, Control, bootstrap_interval, random_control
from headscope.errors import HeadscopeError


def test_bootstrap_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    hits = 0
    for trial in range(100):
        low, high = bootstrap_interval(rng.normal(0.5, 0.1, size=20), resamples=1000, seed=trial)
        hits += low <= 0.5 <= high
    # the percentile bootstrap of a mean of 20 normal draws covers a little under 95 % (~92-93 %)
    assert 0.85 <= hits / 100 <= 0.99


def test_bootstrap_interval_brackets_the_sample_mean_and_shrinks_with_n():
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, size=400)
    low, high = bootstrap_interval(x)
    assert low < x.mean() < high and x.min() < low and high < x.max()
    # about 2 x 1.96 x sd / sqrt(n)
    assert high - low == pytest.approx(2 * 1.96 * x.std(ddof=1) / np.sqrt(len(x)), rel=0.15)
    assert bootstrap_interval([0.25] * 20) == (0.25, 0.25)
    with pytest.raises(HeadscopeError, match="at least 2 draws"):
        bootstrap_interval([0.1])
    with pytest.raises(HeadscopeError, match="finite"):
        bootstrap_interval([0.1, float("nan")])


def test_verdict_only_outside_the_interval_and_only_from_20_draws():
    values = [{"acc": 0.5 + 0.01 * (i % 5)} for i in range(MIN_DRAWS)]  # mean 0.52, interval about [0.514, 0.526]
    control = Control.from_draws(values)
    low, high = control.interval["acc"]
    assert low < 0.52 < high
    assert control.verdict("acc", high + 0.01) == "beats random"
    assert control.verdict("acc", low - 0.01) == "worse than random"
    assert control.verdict("acc", 0.52) == "within random"
    assert control.verdict("acc", low - 0.01, higher_is_better=False) == "beats random"  # e.g. CHAIR, lower is better
    few = Control.from_draws(values[:5])
    assert few.verdict("acc", 0.99).startswith("too few draws") and few.outside("acc", 0.99) == 0


def test_random_control_shares_one_rng_so_longer_runs_extend_shorter_ones():
    measure = lambda rng: {"x": rng.random()}  # noqa: E731
    short, long = random_control(measure, 5, seed=3), random_control(measure, 20, seed=3)
    assert long.draws[:5] == short.draws
    expected = random.Random(3)
    assert [d["x"] for d in long.draws] == [expected.random() for _ in range(20)]
    assert long.mean["x"] == pytest.approx(np.mean([d["x"] for d in long.draws]))
    seen = []
    random_control(measure, 3, seed=0, on_draw=lambda i, r: seen.append(i))
    assert seen == [0, 1, 2]
    with pytest.raises(HeadscopeError, match="draws must be a positive integer"):
        random_control(measure, 0)
