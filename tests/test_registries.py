"""Extending headscope: a new edit kind and a new analyzer, each one module plus its registration,
shipped by a third-party package (tests/example_plugin) found through its entry points. Their
command-line flags appear, their options are checked before any model loads, the edit kind gives
the same generations as the built-in edit it equals, and the analyzer shards and merges bit for bit."""

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from headscope.analyzers import registry as analyzer_registry
from headscope.cli import main
from headscope.errors import HeadscopeError
from headscope.interventions import Edit, intervene, registry
from headscope.model import HeadModel
from headscope.sharding import Part, Shard

PLUGIN = Path(__file__).resolve().parent / "example_plugin" / "headscope_example_plugin"
ENTRY_POINTS = """[headscope.edit_kinds]
damp = headscope_example_plugin.damp

[headscope.analyzers]
norms = headscope_example_plugin.norms
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The example package installed into a folder of its own, with its dist-info metadata."""
    root = tmp_path_factory.mktemp("site")
    shutil.copytree(PLUGIN, root / PLUGIN.name)
    info = root / "headscope_example_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: headscope-example-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    return root


@pytest.fixture
def plugin(site, monkeypatch):
    """The package on sys.path, its entry points loaded; unregistered again afterwards."""
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    registry.load_entry_points(again=True)
    analyzer_registry.load(again=True)
    yield
    registry.unregister("damp")
    analyzer_registry.unregister("norms")
    for name in [m for m in sys.modules if m.startswith("headscope_example_plugin")]:
        del sys.modules[name]


def test_entry_points_register_one_module_each(plugin):
    assert "damp" in registry.kinds() and "norms" in analyzer_registry.analyzers()
    assert registry.get("damp").options.__module__ == "headscope_example_plugin.damp"
    edit = Edit("damp", "L1H5", options={"factor": 0.25})
    assert edit.config.factor == 0.25 and Edit.from_dict(edit.to_dict()) == edit
    with pytest.raises(HeadscopeError, match=r"factor must be in \[0, 1\]"):
        Edit("damp", "L1H5", options={"factor": 1.5})
    with pytest.raises(HeadscopeError, match="unknown damp option"):
        Edit("damp", "L1H5", options={"fraction": 0.5})


def test_new_edit_kind_equals_the_scale_it_amounts_to(plugin):
    """damp by f, strength 1, is z' = f z: the built-in scale edit with strength f (the reference)."""
    hm = HeadModel.load("retrieval")
    ids = torch.tensor([[5, 17, 9, 30, 2, 11, 40, 3]])
    heads = [(1, 5), (1, 4), (2, 0)]
    with torch.no_grad():
        base = hm.model(input_ids=ids).logits
        with intervene(hm, Edit("damp", heads, options={"factor": 0.25})):
            damped = hm.model(input_ids=ids).logits
        with intervene(hm, Edit("scale", heads, strength=0.25)):
            scaled = hm.model(input_ids=ids).logits
    assert not torch.allclose(damped, base, atol=1e-3)  # the edit does something
    torch.testing.assert_close(damped, scaled, atol=1e-5, rtol=1e-5)


def _no_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(HeadModel, "load", refuse)


@pytest.mark.parametrize("argv, message", [
    (["generate", "--prompt", "x", "--damp", "--heads", "L1H5", "--damp-factor", "1.5"], "factor must be in [0, 1]"),
    (["generate", "--prompt", "x", "--var", "--var-p", "1.5"], "p (strength) must be one number in [0, 1]"),
    (["generate", "--prompt", "x", "--var", "--var-rho", "2"], "rho must be a finite number in [0, 1]"),
    (["eval", "--task", "needle", "--damp", "--heads", "L1H5", "--damp-factor", "-1"], "factor must be in [0, 1]"),
    (["score", "--task", "norms", "--tokens", "0"], "--tokens must be in [1, 512]"),
])
def test_options_checked_before_any_model_loads(plugin, monkeypatch, capsys, argv, message):
    _no_load(monkeypatch)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_new_edit_kind_flag_generates_like_scale(plugin, capsys):
    gen = ["generate", "--model", "retrieval", "--prompt", "The secret number", "--max-new-tokens", "4",
           "--heads", "L1H5,L1H4"]
    assert main(gen + ["--damp", "--damp-factor", "0.25"]) == 0
    damped = capsys.readouterr().out.splitlines()
    assert main(gen + ["--scale", "--alpha", "0.25"]) == 0
    scaled = capsys.readouterr().out.splitlines()
    assert damped[-2] == "damping by 0.25 (both) L1H5, L1H4"
    assert damped[-1] == scaled[-1]


def test_new_analyzer_shards_and_merges(plugin, tmp_path, capsys):
    hm = HeadModel.load("retrieval")
    options = analyzer_registry.get("norms").make_options({"tokens": 8})
    whole = analyzer_registry.get("norms").score(hm, options)
    part = analyzer_registry.get("norms").score(hm, options, shard=Shard(1, 3))
    assert isinstance(part, Part) and int((~part.scores.isnan()).sum()) == len(Shard(1, 3).block(hm.all_heads()))
    assert float(whole.scores.max()) == 1.0
    base = ["score", "--task", "norms", "--tokens", "8", "--quiet"]
    assert main(base + ["--out", str(tmp_path / "whole.csv")]) == 0
    for i in range(3):
        assert main(base + ["--shard", f"{i}/3", "--out", str(tmp_path / f"part.{i}")]) == 0
    parts = [str(tmp_path / f"part.{i}") for i in (2, 0, 1)]
    assert main(["merge", *parts, "--out", str(tmp_path / "merged.csv")]) == 0
    assert (tmp_path / "whole.csv").read_bytes() == (tmp_path / "merged.csv").read_bytes()
    assert (tmp_path / "whole.json").read_text() == (tmp_path / "merged.json").read_text()
    capsys.readouterr()


def test_flags_appear_for_an_installed_package(site):
    """In a fresh process, with the package only on PYTHONPATH: its flags are in --help."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1"}
    gen = subprocess.run([sys.executable, "-m", "headscope.cli", "generate", "--help"], capture_output=True,
                         text=True, env=env, timeout=600)
    assert gen.returncode == 0 and "--damp-factor" in gen.stdout and "--damp [CSV]" in gen.stdout
    score = subprocess.run([sys.executable, "-m", "headscope.cli", "score", "--task", "norms", "--help"],
                           capture_output=True, text=True, env=env, timeout=600)
    assert score.returncode == 0 and "--tokens" in score.stdout, score.stderr


def test_every_built_in_analyzer_is_declared_once_under_its_results_method():
    """The registry knows each built-in analyzer by the ``method`` its HeadScores carry."""
    from headscope.analyzers import registry as analyzers

    names = set(analyzers.analyzers())
    assert {"retrieval", "ships", "generalized-ships", "activation_patching", "attribution_patching",
            "path_patching", "previous-token", "duplicate-token", "induction", "sink_first_token",
            "head_pursuit", "vhd", "function_vector_cie"} <= names


def test_a_registered_classic_analyzer_scores_like_its_function(tmp_path):
    """Calling through the registry gives the analyzer function's own result (and method name)."""
    import torch

    from headscope.analyzers import registry as analyzers
    from headscope.analyzers.classic import head_type_scores
    from headscope.model import HeadModel

    hm = HeadModel.load("multitask")
    tokens = torch.randint(5, 60, (2, 24), generator=torch.Generator().manual_seed(0))
    via_registry = analyzers.get("induction").score(hm, tokens=tokens)
    direct = head_type_scores(hm, "induction", tokens=tokens)
    assert via_registry.method == "induction" and torch.equal(via_registry.scores, direct.scores)
