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
from headscope.errors import HeadscopeError
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
        assert "--out" in line and "--needles" in line and "overwrite the input" in line
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
        assert "overwrite the input" in line and fragment in line, line
    assert snapshot(tmp_path) == before


def test_out_is_a_file_of_the_local_model_folder(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "model.safetensors").write_bytes(b"weights")
    before = snapshot(model)
    line = error_of([*FIT, "--model", model, "--out", model / "model.safetensors"])
    assert "--model folder" in line and "overwrite the input" in line
    assert snapshot(model) == before


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


# ------------------------------------------------------------------ formats told by content
def _images(folder: Path, n: int) -> Path:
    from PIL import Image

    folder.mkdir()
    for i in range(n):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(folder / f"img{i}.png")
    return folder


def test_vhd_prompts_told_by_content_not_name(tmp_path):
    """JSONL named .json (or a JSON array named .txt) pairs each prompt with its image: 2 pairs, not
    every line (as plain text) times every image of the folder."""
    from headscope.vision import read_pairs

    images = _images(tmp_path / "imgs", 3)
    rows = [{"image": "img0.png", "prompt": "USER: <image> a"}, {"image": "img2.png", "prompt": "USER: <image> b"}]
    expected = [(images / "img0.png", "USER: <image> a"), (images / "img2.png", "USER: <image> b")]
    (tmp_path / "p.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "p.txt").write_text(json.dumps(rows, indent=2))
    for name in ("p.json", "p.txt"):
        assert read_pairs(tmp_path / name, images) == expected
    (tmp_path / "q.json").write_text(json.dumps({"image": "nope.png", "prompt": "USER: <image> a"}) + "\n")
    line = error_of(["score", "--task", "vhd", "--quiet", "--images", images, "--prompts", tmp_path / "q.json"])
    assert "nope.png does not exist" in line


def test_vhd_ranking_from_jsonl_prompts_named_json(tmp_path):
    """End to end on the vision organism: its 16 JSONL prompts, copied to p.json, give the ranking
    the same file named .jsonl gives (read as plain text they were 16 x 16 = 256 samples)."""
    folder = zoo.organism_path("vision")
    (tmp_path / "p.json").write_bytes((folder / "prompts.jsonl").read_bytes())
    frames = []
    for prompts, out in ((folder / "prompts.jsonl", "a.csv"), (tmp_path / "p.json", "b.csv")):
        argv = ["score", "--task", "vhd", "--quiet", "--images", folder / "images", "--prompts", prompts,
                "--out", tmp_path / out]
        status, _, err = run_case([str(a) for a in argv], early=False)
        assert status == 0, err
        frames.append((tmp_path / out).read_text())
    assert frames[0] == frames[1]


def test_safety_prompts_told_by_content_not_name(tmp_path):
    from headscope.tasks.safety_prompts import load_prompts

    queries = ["write a poem", "say hi"]
    (tmp_path / "p.txt").write_text("".join(json.dumps({"goal": q, "target": "ok"}) + "\n" for q in queries))
    (tmp_path / "p.json").write_text(json.dumps([{"goal": q} for q in queries], indent=2))
    (tmp_path / "p.csv").write_text("".join(json.dumps({"goal": q}) + "\n" for q in queries))
    for name in ("p.txt", "p.json", "p.csv"):
        assert load_prompts(tmp_path / name) == queries, name


def test_plain_text_prompts_that_are_a_csv_or_read_with_column(tmp_path):
    (tmp_path / "adv.txt").write_text("goal,target\nwrite a poem,Sure\n")
    (tmp_path / "plain.txt").write_text("write a poem\nsay hi\n")
    line = error_of([*SAHARA, "--prompts", tmp_path / "adv.txt"])
    assert "CSV header" in line and "*.csv" in line
    line = error_of([*SAHARA, "--prompts", tmp_path / "plain.txt", "--column", "goal"])
    assert "--column goal" in line and "*.csv" in line


def test_jsonl_readers_take_a_json_array(tmp_path):
    """needles, in-context task and circuit pair files: one JSON array reads like JSONL."""
    from headscope.tasks.circuit_pairs import load_pairs
    from headscope.tasks.icl import IclTask
    from headscope.tasks.needle import load_needles

    needle = {"needle": "The code is 42.", "question": "What is the code?", "answer": "42"}
    (tmp_path / "needles.json").write_text(json.dumps([needle, needle], indent=2))
    assert [n.answer for n in load_needles(tmp_path / "needles.json")] == ["42", "42"]
    pairs = [{"input": str(i), "output": str(i + 1)} for i in range(8)]
    (tmp_path / "task.json").write_text(json.dumps(pairs, indent=1))
    task = IclTask.load(tmp_path / "task.json")
    assert sorted(p for split in ("train", "val", "test") for p in task[split]) \
        == sorted((r["input"], r["output"]) for r in pairs)
    pair = {"clean": "a b", "corrupt": "a c", "answer": " b", "wrong": " c"}
    (tmp_path / "pairs.json").write_text(json.dumps([pair], indent=2))
    assert [p.clean for p in load_pairs(tmp_path / "pairs.json")] == ["a b"]


@pytest.mark.parametrize("argv, flag", [
    (["score", "--task", "sinks", "--quiet", "--text"], "text file"),
    (["score", "--task", "pursuit", "--quiet", "--concept"], "concept file"),
    (["eval", *NEEDLE[1:], "--haystack"], "haystack file"),
])
def test_plain_text_inputs_refuse_json(tmp_path, argv, flag):
    (tmp_path / "t.txt").write_text('{"text": "The capital of France is Paris."}\n{"text": "Two plus two."}\n')
    line = error_of([*argv, tmp_path / "t.txt"])
    assert flag in line and "JSON Lines" in line and "plain text" in line


def test_ranking_files_whose_content_is_another_format(tmp_path):
    """A ranking's format comes from its name: a file whose content is another format says which name to use."""
    from headscope.scores import read_ranking

    csv = ranking(tmp_path / "r.csv").read_text()
    retrieval = json.dumps({f"{layer}-{head}": [1.0] for layer in range(4) for head in range(8)})
    duo = "\n".join("\t".join(["1.0"] * 8) for _ in range(4)) + "\n"
    cases = [("a.tsv", csv, "*.csv"), ("b.json", csv, "*.csv"), ("c.yaml", csv, "*.csv"),
             ("d.csv", retrieval, "*.json"), ("e.csv", duo, "*.tsv"), ("f.csv", 'attn_head_set: "0-1"\n', "*.yaml")]
    for name, content, fix in cases:
        (tmp_path / name).write_text(content)
        with pytest.raises(HeadscopeError, match=r"rename it to \*\." + fix[2:]):
            read_ranking(tmp_path / name)
        line = error_of(["eval", *NEEDLE[1:], "--ablate", tmp_path / name, "--top", "2"])
        assert "holds" in line and f"rename it to {fix}" in line
    line = error_of(["eval", *NEEDLE[1:], "--ablate", tmp_path / "r.json", "--top", "2"])  # the sidecar, not the CSV
    assert "sidecar of a headscope ranking" in line and "r.csv" in line
