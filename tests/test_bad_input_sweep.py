"""Bad input found by the hostile-user sweep (tests/bad_input_sweep.py) on the new paths: each case a
traceback or a silently wrong result there before its fix, now one ``error: ...`` line naming the fix
(the pattern of test_bad_input: ``headscope.cli.main(argv)`` in-process, exit status 2; ``early``
cases must fail before any model weights load)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from test_bad_input import run_case

from headscope import zoo
from headscope.errors import HeadscopeError
from headscope.interventions import TaskEmbedding
from headscope.scores import HeadScores
from headscope_kernels import cpu_tile

GEN = ["generate", "--prompt", "The secret", "--max-new-tokens", "1"]
NEEDLE = ["score", "--task", "needle", "--quiet", "--lengths", "64", "--depths", "50"]
NEEDLE_EVAL = ["eval", "--task", "needle", "--quiet", "--lengths", "64", "--depths", "50"]
ICL_TASK = zoo.organism_path("icl") / "taska.jsonl"

# (id, argv, fragment of the one error line, early); {key} names a file of the fixture
CASES = [
    # seeds beyond what torch / numpy take were a traceback (OverflowError / ValueError)
    ("seed-1e23", [*GEN, "--sample", "--seed", str(10 ** 23)], "--seed 100000000000000000000000 is out of range", True),
    ("seed-negative", [*GEN, "--sample", "--seed", "-1"], "--seed -1 is out of range", True),
    ("split-seed-2**64", ["eval", "--task", "icl", "--quiet", "--split-seed", str(2 ** 64)],
     "--split-seed 18446744073709551616 is out of range", True),
    # JSON nested past Python's recursion limit was a RecursionError traceback
    ("edits-deep-nesting", [*GEN, "--edits", "{deep_json}"], "nests JSON too deeply", True),
    ("needles-deep-nesting", [*NEEDLE, "--needles", "{deep_jsonl}"], "nests JSON too deeply", True),
    ("device-map-deep-nesting", [*GEN, "--device-map", "[" * 5000 + "]" * 5000], "--device-map must be auto", True),
    # a JSON device map naming a module the model lacks (a typo) was left unused, silently
    ("device-map-unknown-module", [*GEN, "--device-map", '{"model.layrs.0": "cpu"}'],
     "--device-map names module(s) 'model.layrs.0' that", False),
    # an edits file giving a key twice kept the last one silently (zero became scale)
    ("edits-duplicate-key", [*GEN, "--edits", "{dup_keys}"], "gives the key 'kind' twice in one object", True),
    # JSON true/false as a head index read as 1/0 (L1H0 ablated for [true, false])
    ("edits-head-bool", [*GEN, "--edits", "{head_bool}"], "a head is a (layer, head) pair of integers", True),
    # --lr beyond float32 was a RuntimeError traceback in Adam
    ("fit-lr-1e300", ["inject", "fit", "--model", "icl", "--task", str(ICL_TASK), "--shots", "1", "--prompts", "2",
                      "--steps", "1", "--quiet", "--lr", "1e300", "--out", "{tmp}/e.safetensors"],
     "--lr 1e+300 is beyond float32's range", True),
    # a task file repeating a pair left too few demonstrations: ValueError traceback in random.sample
    ("icl-repeated-pairs", ["eval", "--task", "icl", "--quiet", "--queries", "2", "--shots", "1",
                            "--tasks", "{icl_repeated}"], "the file repeats that pair", False),
    # --max-memory sizes accelerate cannot hold were an OverflowError traceback; a device twice kept the last
    ("max-memory-1e300", [*GEN, "--device-map", "auto", "--max-memory", "cpu=1e300GiB"],
     "--max-memory cpu=1e300GiB: give a size", True),
    ("max-memory-negative", [*GEN, "--device-map", "auto", "--max-memory", "cpu=-5GiB"],
     "--max-memory cpu=-5GiB: give a size", True),
    ("max-memory-twice", [*GEN, "--device-map", "auto", "--max-memory", "cpu=1GiB,cpu=2GiB"],
     "names device cpu twice", True),
    # an edit's strength or extra option without its edit was ignored, the run reported as normal
    ("alpha-without-edit", [*GEN, "--alpha", "3"], "--alpha needs --scale or --vhr", True),
    ("var-p-without-var", [*GEN, "--var-p", "0.3"], "--var-p needs --var", True),
    ("vhr-layers-without-vhr", [*GEN, "--vhr-layers", "1"], "--vhr-layers needs --vhr", True),
    ("kv-rule-without-kv", [*NEEDLE_EVAL, "--kv-rule", "max"], "--kv-rule needs --kv-compress", True),
    ("sink-without-kv", [*GEN, "--sink", "2"], "--sink needs --kv-compress", True),
    # two rankings of different models (same 4x8 grid) overlapped as if their heads were the same: 0.000
    ("overlap-other-model", ["overlap", "{rank_vision}", "{rank_retrieval}", "--top", "2"],
     "heads of different models do not overlap", True),
    ("scope-without-heads-edit", [*GEN, "--scope", "decode"], "--scope decode applies to a heads edit", True),
    ("decore-alpha-without-decore", [*GEN, "--decore-alpha", "2"], "--decore-alpha applies to --decore", True),
    ("eval-decore-alpha-without-decore", [*NEEDLE_EVAL, "--decore-alpha", "2"], "--decore-alpha applies to --decore",
     True),
    # export options of another format were ignored; a qrhead --top beyond the scored heads listed 32
    ("export-kv-rule-qrhead", ["export", "{rank_retrieval}", "--format", "qrhead", "--out", "{tmp}/k.yaml",
                               "--kv-rule", "max"], "--kv-rule applies to --format duo only", True),
    ("export-sink-retrieval-head", ["export", "{rank_retrieval}", "--format", "retrieval-head", "--out",
                                    "{tmp}/k.json", "--sink", "2"], "--sink applies to --format duo only", True),
    ("export-top-duo", ["export", "{rank_retrieval}", "--format", "duo", "--out", "{tmp}/duo", "--top", "3"],
     "--top applies to --format qrhead only", True),
    ("export-top-beyond-heads", ["export", "{rank_retrieval}", "--format", "qrhead", "--out", "{tmp}/t.yaml",
                                 "--top", "1000"], "scores only 32 heads; use --top <= 32", True),
    # export wrote a Retrieval_Head JSON named .yaml (or a QRHead YAML named .json) that reading refuses
    ("export-rh-named-yaml", ["export", "{ranking}", "--format", "retrieval-head", "--out", "{tmp}/rh.yaml"],
     "name it *.json", True),
    ("export-qrhead-named-json", ["export", "{ranking}", "--format", "qrhead", "--out", "{tmp}/q.json"],
     "name it *.yaml", True),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad_sweep")
    f = {"tmp": str(tmp)}
    (tmp / "deep.json").write_text("[" * 100000 + "]" * 100000)
    f["deep_json"] = str(tmp / "deep.json")
    (tmp / "deep.jsonl").write_text("{\"needle\": " + "[" * 100000 + "]" * 100000 + "}\n")
    f["deep_jsonl"] = str(tmp / "deep.jsonl")
    (tmp / "dup_keys.json").write_text('[{"kind": "zero", "kind": "scale", "heads": ["L0H0"]}]')
    f["dup_keys"] = str(tmp / "dup_keys.json")
    (tmp / "head_bool.json").write_text(json.dumps([{"kind": "zero", "heads": [[True, False]]}]))
    f["head_bool"] = str(tmp / "head_bool.json")
    first = ICL_TASK.read_text().splitlines(keepends=True)[0]
    (tmp / "icl_repeated.jsonl").write_text(first * 24)
    f["icl_repeated"] = str(tmp / "icl_repeated.jsonl")
    g = torch.Generator().manual_seed(0)
    for model in ("vision", "retrieval"):
        HeadScores(torch.rand(4, 8, generator=g), "some_task", model).to_csv(tmp / f"rank_{model}.csv")
        f[f"rank_{model}"] = str(tmp / f"rank_{model}.csv")
    shutil.copy(zoo.organism_path("retrieval") / "ground_truth.csv", tmp / "ranking.csv")
    f["ranking"] = str(tmp / "ranking.csv")
    return f


def _fill(arg: str, files: dict) -> str:
    for key, value in files.items():
        arg = arg.replace("{" + key + "}", value)
    return arg


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_sweep(case, files):
    name, argv, fragment, early = case
    got, out, err = run_case([_fill(a, files) for a in argv], early)
    assert got == 2, f"{name}: status {got}\nstdout: {out}\nstderr: {err}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment in lines[0], lines[0]


def test_overlap_of_two_models_with_force(files):
    """--force overlaps them knowingly: the same arithmetic as before."""
    got, out, err = run_case(["overlap", files["rank_vision"], files["rank_retrieval"], "--top", "2", "--force"], True)
    assert got == 0, err
    assert "jaccard:" in out


@pytest.mark.parametrize("value", ["maybe", "\u00f6ff"])
def test_kernel_switch_misspelt_is_one_line_before_loading(value, monkeypatch):
    """HEADSCOPE_CPU_KERNEL=maybe was a ValueError traceback from the first attention call."""
    monkeypatch.setenv("HEADSCOPE_CPU_KERNEL", value)
    got, out, err = run_case(["score", "--task", "sinks", "--quiet", "--max-tokens", "16"], early=True)
    assert got == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: HEADSCOPE_CPU_KERNEL={value!r} is not understood"), err


def test_unreadable_embedding_is_named_so(tmp_path, monkeypatch):
    """A task embedding the user may not read was reported as "No such file or directory" by safetensors
    (as root, where chmod 000 is no bar, the read itself is made to fail)."""
    path = tmp_path / "emb.safetensors"
    TaskEmbedding(torch.zeros(4, 4, 32), {"model": "icl"}, torch.full((4, 4), 0.5)).save(path)
    real_open = Path.open

    def refuse(self, *args, **kwargs):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refuse)
    with pytest.raises(HeadscopeError, match="cannot read task embedding .*Permission denied"):
        TaskEmbedding.load(path)


@pytest.mark.skipif(cpu_tile._compiler() is None, reason="no C++ compiler")
def test_kernel_digest_private_under_umask_000(tmp_path, monkeypatch):
    """Under umask 000 the library's recorded SHA-256 was written 0666 (the library 0700)."""
    monkeypatch.setenv("HEADSCOPE_CACHE", str(tmp_path / "cache"))
    old = os.umask(0)
    try:
        cpu_tile._build(cpu_tile._compiler())
    finally:
        os.umask(old)
    (digest,) = (tmp_path / "cache").glob("*.sha256")
    (lib,) = (tmp_path / "cache").glob("*.so")
    assert digest.stat().st_mode & 0o777 == 0o600
    assert lib.stat().st_mode & 0o777 == 0o700


def test_merge_of_parts_with_other_needles_names_the_input_files(tmp_path):
    """Parts scored on different --needles files differed in 'provenance.prompt_set_sha256' only, a
    name that does not tell the user which option differs."""
    needles = Path(__file__).resolve().parent.parent / "datasets" / "needles.jsonl"
    lines = needles.read_text().splitlines(keepends=True)
    (tmp_path / "other.jsonl").write_text("".join(lines[1:] + lines[:1]))  # same needles, another order
    base = [*NEEDLE[:-1], "0,50,100", "--shard"]
    assert run_case([*base, "0/2", "--out", str(tmp_path / "a.0")], False)[0] == 0
    assert run_case([*base, "1/2", "--needles", str(tmp_path / "other.jsonl"), "--out", str(tmp_path / "b.1")],
                    False)[0] == 0
    got, out, err = run_case(["merge", str(tmp_path / "a.0"), str(tmp_path / "b.1"), "--out", str(tmp_path / "m.csv")],
                             True)
    assert got == 2, err
    assert "the contents of its input files (--needles" in err, err
    assert not (tmp_path / "m.csv").exists()
