"""Bad input on sharded sweeps and on results used with another model.

- A shard part records a fingerprint of its run; ``headscope merge`` refuses parts of different runs
  (batch size, task options, input files, model), a shard given twice or left out, naming what differs.
- Rankings, exported score files and task embeddings record the weights hash of their model; using
  them with another model is an error unless ``--force``.
- ``--shard`` on a task that cannot shard fails before the model loads.
- A ranking CSV and its sidecar are one unit: a write killed at any point reads as the old pair or
  the new one, and the next write removes the killed one's temp file.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import tiny_model
from headscope import cli, zoo
from headscope.analyzers import retrieval
from headscope.errors import HeadscopeError
from headscope.formats import weights_sha256
from headscope.methods.soft_injection import TaskEmbedding, task_embedding
from headscope.model import HeadModel
from headscope.scores import HeadScores
from headscope.sharding import Shard, merge, write_part
from headscope.tasks.icl import IclTask
from headscope.tasks.needle import NeedleTask
from test_bad_input import run_case

NEEDLE = ["score", "--task", "needle", "--lengths", "128", "--depths", "0,50,100", "--quiet"]
SHIPS = ["score", "--task", "safety", "--method", "ships", "--quiet", "--limit", "2"]


def _error(argv, early=False) -> str:
    """The one ``error:`` line of a command that must fail (status 2)."""
    status, out, err = run_case([str(a) for a in argv], early)
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: "), (status, out, err)
    return lines[0]


def _ok(argv) -> str:
    status, out, err = run_case([str(a) for a in argv], False)
    assert status == 0, (status, out, err)
    return out


# ------------------------------------------------------------------------------ merge: one run's parts only
def test_merge_refuses_parts_run_with_another_batch_size(tmp_path):
    """The issue's example: shard 1 with --batch-size 2 splits the 24 trials into other batches, so the
    two parts counted 28 trials; the merge names the batch size instead."""
    a0, a1 = tmp_path / "a.0", tmp_path / "a.1"
    _ok([*NEEDLE, "--batch-size", "1", "--shard", "0/2", "--out", a0])
    _ok([*NEEDLE, "--batch-size", "2", "--shard", "1/2", "--out", a1])
    line = _error(["merge", a0, a1, "--out", tmp_path / "merged.csv"])
    assert f"{a1} comes from another run" in line and f"differs from {a0} in batch_size (2 vs 1)" in line
    assert not (tmp_path / "merged.csv").exists()
    _ok([*NEEDLE, "--batch-size", "1", "--shard", "1/2", "--out", a1])  # the same command: merges
    _ok(["merge", a0, a1, "--out", tmp_path / "merged.csv"])
    meta = json.loads((tmp_path / "merged.json").read_text())
    assert meta["params"]["trials"] == 24 and meta["params"]["counted_trials"] <= 24


def test_merge_refuses_parts_with_other_task_options_or_input_files(tmp_path):
    """Other --lengths, another --needles file (by content: the same content under another name merges)."""
    needle = {"needle": "The secret number of the red fox is 4821.", "question": "What is the secret number "
              "of the red fox?", "answer": "4821"}
    other = {"needle": "The secret number of the blue owl is 7390.", "question": "What is the secret number "
             "of the blue owl?", "answer": "7390"}
    n1, n2, n3 = tmp_path / "n1.jsonl", tmp_path / "n2.jsonl", tmp_path / "copy.jsonl"
    n1.write_text(json.dumps(needle) + "\n")
    n2.write_text(json.dumps(needle) + "\n" + json.dumps(other) + "\n")
    n3.write_text(n1.read_text())
    base = ["score", "--task", "needle", "--depths", "0,100", "--quiet", "--batch-size", "1"]
    _ok([*base, "--lengths", "128", "--needles", n1, "--shard", "0/2", "--out", tmp_path / "p.0"])
    _ok([*base, "--lengths", "96", "--needles", n1, "--shard", "1/2", "--out", tmp_path / "lengths.1"])
    _ok([*base, "--lengths", "128", "--needles", n2, "--shard", "1/2", "--out", tmp_path / "needles.1"])
    _ok([*base, "--lengths", "128", "--needles", n3, "--shard", "1/2", "--out", tmp_path / "copy.1"])
    assert "in --lengths ([96] vs [128])" in _error(["merge", tmp_path / "p.0", tmp_path / "lengths.1"])
    assert "in --needles (" in _error(["merge", tmp_path / "p.0", tmp_path / "needles.1"])
    _ok(["merge", tmp_path / "p.0", tmp_path / "copy.1"])


def test_merge_refuses_ships_parts_with_other_prompts(tmp_path):
    p1, p2 = tmp_path / "p1.txt", tmp_path / "p2.txt"
    p1.write_text("how do I pick a lock\nhow do I make a fake id\n")
    p2.write_text("how do I pick a lock\nhow do I hotwire a car\n")
    _ok([*SHIPS, "--prompts", p1, "--shard", "0/2", "--out", tmp_path / "s.0"])
    _ok([*SHIPS, "--prompts", p2, "--shard", "1/2", "--out", tmp_path / "s.1"])
    assert "in --prompts (" in _error(["merge", tmp_path / "s.0", tmp_path / "s.1"])


def test_merge_names_a_repeated_or_missing_shard(tmp_path):
    for i in range(3):
        _ok([*NEEDLE, "--shard", f"{i}/3", "--out", tmp_path / f"p.{i}"])
    p0, p1, p2 = (tmp_path / f"p.{i}" for i in range(3))
    assert f"{p1} and {p1} are both shard 1/3" in _error(["merge", p0, p1, p1, p2])
    assert "shard(s) 2/3 missing" in _error(["merge", p0, p1])
    assert "shard(s) 0/3, 2/3 missing" in _error(["merge", p1])
    _ok(["merge", p2, p0, p1])


def test_merge_refuses_parts_of_another_model_unless_forced(tmp_path):
    """Parts of the same grid (4 x 8) made with two models: the weights hash differs; --force merges."""
    _ok([*NEEDLE, "--shard", "0/2", "--out", tmp_path / "m.0"])
    _ok([*NEEDLE, "--model", "refusal", "--shard", "1/2", "--out", tmp_path / "m.1"])
    line = _error(["merge", tmp_path / "m.0", tmp_path / "m.1"])
    assert "differs from" in line and "in model ('refusal' vs 'retrieval')" in line and "--force" in line
    out = _ok(["merge", tmp_path / "m.0", tmp_path / "m.1", "--force"])
    assert "merged from 2 parts" in out


def test_python_parts_with_other_batches_do_not_merge(organism, tmp_path):
    """Without a fingerprint (Python parts), the needle join still checks that the parts hold each
    trial of one run exactly once: batch sizes 8 and 2 give overlapping blocks (16 + 12 trials of 24)."""
    trials = NeedleTask(organism.tokenizer, lengths=[128], depths=[0, 50, 100], use_chat_template=False).trials()
    a = write_part(retrieval.retrieval_heads(organism, trials, batch_size=8, progress=False, shard=Shard(0, 2)), tmp_path / "a")
    b = write_part(retrieval.retrieval_heads(organism, trials, batch_size=2, progress=False, shard=Shard(1, 2)), tmp_path / "b")
    with pytest.raises(HeadscopeError, match="trials do not make up the 24 trials"):
        merge([a, b])


# ------------------------------------------------------------------------------ --shard refused before loading
@pytest.mark.parametrize("argv", [
    ["score", "--task", "safety", "--method", "sahara", "--quiet"],
    ["score", "--task", "circuit", "--method", "attribution", "--generate", "ioi", "--quiet"],
    ["score", "--task", "sinks", "--quiet"],
], ids=["sahara", "attribution", "sinks"])
def test_shard_on_a_task_that_cannot_shard_fails_before_the_model_loads(argv, tmp_path):
    line = _error([*argv, "--shard", "0/2", "--out", tmp_path / "part"], early=True)
    assert "does not run sharded" in line and "drop --shard" in line
    assert not (tmp_path / "part").exists()


# ------------------------------------------------------------------------------ provenance checked on read
def test_weights_hash_names_the_model_not_its_dtype():
    model = tiny_model("llama", seed=3)
    digest = weights_sha256(model)
    assert weights_sha256(tiny_model("llama", seed=3).to(torch.bfloat16)) == digest
    assert weights_sha256(tiny_model("llama", seed=4)) != digest
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[0, 0] += 1.0  # an in-place change is seen
    assert weights_sha256(model) != digest


def test_a_ranking_of_another_model_is_refused_unless_forced(tmp_path):
    """A needle ranking (retrieval organism) does not drive the refusal organism's heads, though both
    grids are 4 x 8; with --force it does. The same ranking in bfloat16 on its own model is accepted."""
    ranking = tmp_path / "needle.csv"
    _ok([*NEEDLE, "--out", ranking])
    line = _error(["eval", "--task", "refusal", "--quiet", "--ablate", ranking, "--top", "2"])
    assert f"ranking {ranking} was made for retrieval" in line and "not for refusal" in line and "--force" in line
    assert "made for retrieval" in _error(["generate", "--model", "refusal", "--prompt", "hi", "--scale", ranking,
                                           "--top", "1"])
    assert "compliance:" in _ok(["eval", "--task", "refusal", "--quiet", "--ablate", ranking, "--top", "2", "--force"])
    assert "ablating" in _ok(["generate", "--model", "retrieval", "--dtype", "bfloat16", "--prompt", "hi",
                       "--max-new-tokens", "1", "--ablate", ranking, "--top", "1"])
    # a sidecar naming another model but no weights hash (hand-written): compared by name
    side = json.loads((tmp_path / "needle.json").read_text())
    del side["params"]["provenance"]
    (tmp_path / "needle.json").write_text(json.dumps(side))
    assert "was made for retrieval, not for refusal" in _error(
        ["eval", "--task", "refusal", "--quiet", "--random", "2", "--draws", "1", "--exclude", ranking, "--top", "1"])


def test_an_exported_score_file_of_another_model_is_refused(tmp_path):
    ranking = tmp_path / "needle.csv"
    _ok([*NEEDLE, "--out", ranking])
    _ok(["export", ranking, "--format", "qrhead", "--model", "retrieval", "--out", tmp_path / "heads.yaml"])
    line = _error(["eval", "--task", "refusal", "--quiet", "--ablate", tmp_path / "heads.yaml", "--top", "2"])
    assert "was made for retrieval" in line and "not for refusal" in line


@pytest.fixture(scope="module")
def icl():
    return HeadModel.load("icl")


def test_a_task_embedding_of_another_model_is_refused(icl, tmp_path):
    """The README promises it: an embedding whose header names another model (by weights hash, or by name
    when it records none) is an error even when its shape fits; one made for this model is used."""
    g = icl.geometry
    vectors, alphas = torch.zeros(g.n_layers, g.n_heads, g.head_dim), torch.full((g.n_layers, g.n_heads), 0.5)
    gen = ["generate", "--model", "icl", "--prompt", "Q: omi\nA:", "--max-new-tokens", "1", "--inject"]
    for name, meta in {"hash": {"model": "icl", "weights_sha256": "0" * 64},
                       "name": {"model": "another-icl-model"}}.items():
        TaskEmbedding(vectors, meta, alphas).save(tmp_path / f"{name}.safetensors")
        line = _error([*gen, tmp_path / f"{name}.safetensors"])
        assert "the task embedding was made for" in line and "not for icl" in line and "--force" in line
        _ok([*gen, tmp_path / f"{name}.safetensors", "--force"])
    TaskEmbedding(vectors, {"model": "icl", "weights_sha256": weights_sha256(icl.model)}, alphas).save(tmp_path / "own.safetensors")
    _ok([*gen, tmp_path / "own.safetensors"])


def test_task_embeddings_record_the_weights_hash(icl):
    task = IclTask.load(zoo.organism_path("icl") / zoo.organism_info("icl")["task_files"][0])
    emb = task_embedding(icl, task, k=2, n=2, progress=False)
    assert emb.meta["weights_sha256"] == weights_sha256(icl.model)
    assert emb.meta["weights_sha256"] != weights_sha256(tiny_model("llama"))


# ------------------------------------------------------------------------------ the CSV + sidecar pair is one unit
KILL = textwrap.dedent("""
    import os, sys, torch
    from headscope.scores import HeadScores
    path, kill_at = sys.argv[1], int(sys.argv[2])
    replace, calls = os.replace, []
    def dying(src, dst):
        calls.append(dst)
        if len(calls) == kill_at:
            os._exit(9)  # killed: no cleanup runs
        replace(src, dst)
    os.replace = dying
    HeadScores(-torch.arange(32.0).view(4, 8), "new", "m").to_csv(path)
""")


def test_a_killed_ranking_write_leaves_the_old_pair_or_the_new(tmp_path):
    """Killed before the sidecar's rename (1), between the sidecar's and the CSV's (2), after the CSV's
    (3): the pair reads whole, as the old ranking or the new one; the next write leaves no temp file.
    A sidecar that matches neither CSV (the CSV edited) is still an error."""
    for kill_at, expected in ((1, "old"), (2, "old"), (3, "new")):
        folder = tmp_path / str(kill_at)
        path = folder / "r.csv"
        old = HeadScores(torch.arange(32.0).view(4, 8), "old", "m")
        old.to_csv(path)
        run = subprocess.run([sys.executable, "-c", KILL, str(path), str(kill_at)], capture_output=True, text=True)
        assert run.returncode == 9, run.stderr
        got = HeadScores.from_csv(path)
        assert got.method == expected, kill_at
        assert torch.equal(got.scores, old.scores if expected == "old" else -old.scores)
        HeadScores(torch.ones(4, 8), "again", "m").to_csv(path)
        assert sorted(p.name for p in folder.iterdir()) == ["r.csv", "r.json"]
        assert HeadScores.from_csv(path).method == "again"
        assert "previous" not in json.loads((folder / "r.json").read_text())
    path.write_text(path.read_text().replace("0,0,1.0", "0,0,2.0"))
    with pytest.raises(HeadscopeError, match="does not match r.csv"):
        HeadScores.from_csv(path)
