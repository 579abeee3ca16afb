"""Bad file paths and file contents: outputs that would clobber other outputs or inputs, names the
file system refuses, contents whose format the extension misstates, and writes that fail.

Each CLI case runs ``headscope.cli.main`` in-process with model loading replaced by a failure
(``early``), so an error shows it came before any weights were loaded, and checks that the files
that were there are unchanged.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from headscope import zoo
from headscope.scores import HeadScores
from test_bad_input import run_case

ICL_TASK = str(zoo.organism_path("icl") / zoo.organism_info("icl")["task_files"][0])
NEEDLE = ["score", "--task", "needle", "--quiet", "--lengths", "64", "--depths", "50"]
SAHARA = ["score", "--task", "safety", "--quiet", "--method", "sahara", "--max-heads", "1", "--limit", "2"]
FIT = ["inject", "fit", "--quiet", "--task", ICL_TASK, "--steps", "1", "--prompts", "2", "--shots", "2"]


def error_of(argv, early: bool = True) -> str:
    """The one ``error:`` line of a run that must fail (before the model loads when ``early``)."""
    status, out, err = run_case([str(a) for a in argv], early)
    assert status == 2, f"status {status}\nstdout: {out}\nstderr: {err}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def ranking(path: Path) -> Path:
    return HeadScores(torch.arange(32.0).view(4, 8), "test", "retrieval").to_csv(path)


def needles(path: Path) -> Path:
    path.write_text(json.dumps({"needle": "The code is 42.", "question": "What is the code?", "answer": "42"}) + "\n")
    return path


# ------------------------------------------------------------------ outputs against outputs
def test_inject_fit_embedding_is_the_scores_sidecar(tmp_path):
    line = error_of([*FIT, "--out", tmp_path / "emb.json", "--scores", tmp_path / "emb.csv"])
    assert "--out" in line and "--scores" in line and "same file" in line
    assert not list(tmp_path.iterdir())


def test_sahara_state_is_the_rankings_sidecar(tmp_path):
    (tmp_path / "s.json").write_text('{"method": "sahara"}')  # an old state: must survive
    before = snapshot(tmp_path)
    line = error_of([*SAHARA, "--state", tmp_path / "s.json", "--out", tmp_path / "s.csv"])
    assert "--state" in line and "--out" in line and "same file" in line
    assert snapshot(tmp_path) == before


def test_ranking_named_other_than_csv_is_refused(tmp_path):
    """r.tsv and r.csv would share the sidecar r.json (and a .tsv reads back as a DuoAttention file)."""
    for name in ("r.tsv", "r", "r.txt"):
        line = error_of([*NEEDLE, "--out", tmp_path / name])
        assert "*.csv" in line and "r.csv" in line
    assert not list(tmp_path.iterdir())


def test_output_that_replaces_an_existing_rankings_sidecar(tmp_path):
    ranking(tmp_path / "r.csv")
    before = snapshot(tmp_path)
    line = error_of([*FIT, "--out", tmp_path / "r.json"])
    assert "sidecar of the ranking" in line and "r.csv" in line
    assert snapshot(tmp_path) == before


def test_ranking_whose_sidecar_name_holds_another_file(tmp_path):
    """A file that is not a ranking sidecar is refused; a ranking written again replaces its own pair."""
    (tmp_path / "emb.json").write_text('{"vectors": "mine"}')
    before = snapshot(tmp_path)
    line = error_of([*NEEDLE, "--out", tmp_path / "emb.csv"])
    assert "not a ranking sidecar" in line
    assert snapshot(tmp_path) == before
    ranking(tmp_path / "r.csv")
    status, _, err = run_case([*NEEDLE, "--out", str(tmp_path / "r.csv")], early=False)
    assert status == 0, err
    rewritten = HeadScores.from_csv(tmp_path / "r.csv")  # the sidecar's hash matches the new CSV
    assert rewritten.method != "test" and rewritten.method == json.loads((tmp_path / "r.json").read_text())["method"]


# ------------------------------------------------------------------ outputs against inputs
def test_out_is_the_needles_file_by_other_spellings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    needles(tmp_path / "n.csv")
    os.symlink("n.csv", tmp_path / "link.csv")
    os.link(tmp_path / "n.csv", tmp_path / "hard.csv")
    before = snapshot(tmp_path)
    for out, given in (("n.csv", "./n.csv"), ("./sub/../n.csv", str(tmp_path / "n.csv")), ("link.csv", "n.csv"),
                       ("hard.csv", "n.csv")):
        line = error_of([*NEEDLE, "--out", out, "--needles", given])
        assert "--out" in line and "--needles" in line and "replace the input" in line
    assert snapshot(tmp_path) == before


def test_out_is_an_input_of_each_kind(tmp_path):
    needles(tmp_path / "n.jsonl")
    (tmp_path / "p.csv").write_text("goal\nsay hi\n")
    ranking(tmp_path / "a.csv")
    (tmp_path / "part.0").write_bytes(b"not a part")
    before = snapshot(tmp_path)
    cases = [
        ([*SAHARA, "--prompts", tmp_path / "p.csv", "--out", tmp_path / "p.csv"], "--prompts"),
        ([*SAHARA, "--prompts", tmp_path / "p.csv", "--state", tmp_path / "p.csv"], "--prompts"),
        ([*FIT[:3], "--task", tmp_path / "n.jsonl", "--out", tmp_path / "n.jsonl"], "--task"),
        (["merge", tmp_path / "part.0", tmp_path / "a.csv", "--out", tmp_path / "a.csv"], "input"),
        (["overlap", tmp_path / "a.csv", tmp_path / "a.csv", "--top", "2", "--plot", tmp_path / "a.json"], "sidecar"),
        (["export", tmp_path / "a.csv", "--format", "qrhead", "--out", tmp_path / "a.csv"], "input"),
    ]
    for argv, fragment in cases:
        line = error_of(argv)
        assert "replace the input" in line and fragment in line, line
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------ names and folders
@pytest.mark.parametrize("flag", ["--out", "--needles", "--haystack"])
def test_empty_path_is_an_error(flag):
    line = error_of([*NEEDLE, flag, ""])
    assert f"{flag} is empty" in line


def test_empty_scores_path_of_inject_fit(tmp_path):
    line = error_of([*FIT, "--out", tmp_path / "e.safetensors", "--scores", ""])
    assert "--scores is empty" in line


def test_legal_name_whose_temp_file_is_too_long(tmp_path):
    name = "a" * 250 + ".csv"  # 254 bytes: a legal name, but not its temp file .NAME.XXXXXXXX.tmp
    line = error_of([*NEEDLE, "--out", tmp_path / name])
    assert "255" in line and "at most 241 bytes" in line
    export_name = "b" * 225 + ".json"  # fine, but its sidecar NAME.headscope.json has too long a temp file
    line = error_of(["export", tmp_path / "x.csv", "--format", "retrieval-head", "--out", tmp_path / export_name])
    assert "provenance sidecar" in line
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------ writes the file system refuses
def _limited_run(argv, cwd: Path, limit: int) -> subprocess.CompletedProcess:
    """``headscope ARGV`` in a subprocess whose files may hold at most ``limit`` bytes (``ulimit -f``:
    a full disk without root; Python ignores SIGXFSZ, so a write past it fails with EFBIG)."""

    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "headscope.cli", *map(str, argv)], cwd=cwd, env=env,
                          preexec_fn=cap, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("what, argv, out", [
    ("safetensors embedding", [*FIT, "--out", "e.safetensors"], "e.safetensors"),
    ("shard part", [*NEEDLE, "--depths", "0,50,100", "--shard", "0/2", "--out", "part.0"], "part.0"),
])
def test_binary_writes_past_the_file_size_limit(tmp_path, what, argv, out):
    """safetensors and torch.save raise their own errors on a full disk; the file system's error
    must come out as one line, with the old file intact and no temp file left."""
    (tmp_path / out).write_bytes(b"the old file")
    run = _limited_run(argv, tmp_path, limit=1024)
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 2 and len(lines) == 1, run.stderr
    assert lines[0].startswith(f"error: cannot write {out}: File too large"), lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [out]  # no orphan temp file
    assert (tmp_path / out).read_bytes() == b"the old file"
