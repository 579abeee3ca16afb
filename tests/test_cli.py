"""The command line end to end, in subprocesses, as a user runs it."""

import os
import subprocess
import sys

import pandas as pd
import pytest

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def headscope(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "headscope.cli", *args], capture_output=True, text=True,
                          env=ENV, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def ranking(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "ranking.csv"
    run = headscope("score", "--task", "needle", "--out", str(out), "--quiet")
    assert run.returncode == 0, run.stderr
    return out, run


def test_score_writes_one_row_per_head(ranking):
    out, run = ranking
    frame = pd.read_csv(out)
    assert list(frame.columns[:3]) == ["layer", "head", "score"]
    assert len(frame) == len(frame.drop_duplicates(["layer", "head"])) == 4 * 8  # organism: 4 layers x 8 heads
    assert frame["score"].is_monotonic_decreasing
    assert out.with_suffix(".json").exists() and "retrieval scores" in run.stdout


def test_eval_prints_accuracy_last(ranking):
    out, _ = ranking
    base = headscope("eval", "--task", "needle", "--quiet")
    ablated = headscope("eval", "--task", "needle", "--ablate", str(out), "--top", "3", "--quiet")
    control = headscope("eval", "--task", "needle", "--random", "3", "--exclude", str(out), "--seed", "0", "--draws", "2",
                       "--quiet")
    values = []
    for run in (base, ablated, control):
        assert run.returncode == 0, run.stderr
        last = run.stdout.strip().splitlines()[-1]
        assert last.startswith("accuracy: ")
        values.append(float(last.split()[1]))
    assert values[0] >= 0.9 and values[1] <= 0.3 and values[2] > values[1]


def test_models_lists_the_organism():
    run = headscope("models")
    assert run.returncode == 0 and run.stdout.startswith("retrieval\t")


@pytest.mark.parametrize(
    "args, message",
    [
        (["score", "--task", "needle", "--model", "nobody/no-such-model"], "pass the local folder"),
        (["score", "--task", "needle", "--lengths", "100000"], "exceeds the model's"),
        (["score", "--task", "needle", "--lengths", "10"], "too short for the needle"),
        (["eval", "--task", "needle", "--ablate", "MISSING.csv", "--top", "2"], "does not exist"),
        (["eval", "--task", "needle", "--ablate", "BAD.csv", "--top", "2"], r"outside the 4x8 grid"),
        (["score", "--task", "needle", "--needles", "EMPTY.jsonl"], "holds no needles"),
        (["score", "--task", "needle", "--needles", "BROKEN.jsonl"], "is not valid JSON"),
    ],
)
def test_errors_are_clear_and_exit_2(tmp_path, args, message):
    (tmp_path / "BAD.csv").write_text("layer,head,score\n9,0,1.0\n0,99,0.5\n")
    (tmp_path / "EMPTY.jsonl").write_text("")
    (tmp_path / "BROKEN.jsonl").write_text("{nope\n")
    run = headscope(*args, "--quiet", cwd=tmp_path)
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("error: ")
    import re

    assert re.search(message, run.stderr), run.stderr
