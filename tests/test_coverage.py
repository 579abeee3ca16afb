"""The architecture coverage matrix (tests/coverage_matrix.py): every family against eager attention.

Each family is a tiny random-init model; see the module docstring for the four checks. The README
table is generated from the same table rows, and a test keeps it in sync.
"""

from pathlib import Path

import pytest
import torch

import coverage_matrix as coverage
from headscope.hf import adapters, attention
from headscope.errors import HeadscopeError
from headscope.model import HeadModel

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize("fam", coverage.FAMILIES, ids=lambda f: f.name)
def test_family(fam):
    results = coverage.run_family(fam)
    if fam.unsupported:  # refused with a HeadscopeError that says why, never a shape error
        assert fam.unsupported in results["refused"], results
    else:
        assert results == coverage.expected(fam), results


def test_matrix_covers_the_issue_families():
    supported = [f for f in coverage.FAMILIES if not f.unsupported]
    assert len(supported) >= 25
    types = {f.model_type for f in supported}
    assert {"gpt_neox", "opt", "falcon", "gemma2", "deepseek_v3", "t5", "bart", "gptj", "qwen3_moe", "jamba"} <= types


@pytest.mark.parametrize("name, drop", [("Gemma 2", "softcap"), ("T5", "attn_mask")])
def test_stats_check_catches_a_dropped_score_term(monkeypatch, name, drop):
    """Negative control: without the softcap (Gemma 2) or T5's position bias the statistics check fails."""
    fam = coverage.family(name)
    model = coverage.build_model(fam)
    inputs = coverage.sample_inputs(model)
    patterns = coverage.eager_patterns(model, inputs)
    real = attention.kernel_arguments

    def without(*args, **kwargs):
        return {**real(*args, **kwargs), drop: None}

    monkeypatch.setattr(attention, "kernel_arguments", without)
    with pytest.raises(AssertionError):
        coverage.check_stats(HeadModel(model), inputs, patterns)


def test_gemma2_alternates_sliding_and_global_layers_at_twice_the_window():
    model = coverage.build_model(coverage.family("Gemma 2"))
    assert model.config.layer_types[:2] == ["sliding_attention", "full_attention"]
    assert coverage.SEQ >= 2 * model.config.sliding_window


def test_encoder_decoder_stacks_are_named_and_selectable():
    hm = HeadModel(coverage.build_model(coverage.family("T5")))
    assert hm.stack_layers("encoder") == [0, 1] and hm.stack_layers("decoder") == [2, 3]
    assert hm.stack_layers("cross") == [4, 5]
    assert hm.layer_names[4] == "decoder.block.0.layer.1.EncDecAttention"
    with pytest.raises(HeadscopeError, match="choose from"):
        hm.stack_layers("middle")
    llama = HeadModel(coverage.build_model(coverage.family("Llama")))
    with pytest.raises(HeadscopeError, match="single stack"):
        llama.stack_layers("cross")


def test_mla_head_dim_is_the_value_head_dim():
    hm = HeadModel(coverage.build_model(coverage.family("DeepSeek-V3")))
    assert hm.geometry.head_dim == 6  # v_head_dim; queries and keys have 8 + 4


def test_hybrid_keeps_only_attention_blocks():
    hm = HeadModel(coverage.build_model(coverage.family("Jamba (attention layers)")))
    assert hm.layer_names == ["model.layers.1.self_attn", "model.layers.3.self_attn"]


def test_unknown_layout_names_the_model():
    blob = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(HeadscopeError, match="Sequential: its module layout matches none of the supported families"):
        adapters.find_layers(blob)


def test_readme_table_is_generated_from_the_matrix():
    section = coverage.readme_section(README.read_text())
    assert section is not None, "README lacks the coverage-table markers"
    assert section == coverage.render_table(), "README table is stale: run python tests/coverage_matrix.py --readme README.md"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is fastest and spins no idle workers on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", ["GPT-NeoX (Pythia)", "Gemma 2"])
def test_cli_end_to_end_on_a_local_folder(tmp_path, monkeypatch, capsys, name):
    """``headscope score --task induction`` then ``headscope generate --ablate`` on a local folder
    (in-process through the CLI's main; tests/test_cli.py covers the console-script subprocess)."""
    from headscope.cli import main

    coverage.save_family(coverage.family(name), tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    assert main(["score", "--task", "induction", "--model", "./model", "--out", "ranking.csv", "--quiet"]) == 0
    rows = (tmp_path / "ranking.csv").read_text().strip().splitlines()
    assert rows[0].startswith("layer,head,score") and len(rows) == 1 + 2 * 4  # 2 layers x 4 heads
    capsys.readouterr()
    code = main(["generate", "--model", "./model", "--prompt", "a b c a b", "--ablate", "ranking.csv", "--top", "3",
                 "--max-new-tokens", "4"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "ablating (zero, both)" in out.out
