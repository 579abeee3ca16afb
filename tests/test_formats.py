"""Head-score files both ways: DuoAttention, Retrieval_Head, QRHead."""

import json

import pytest
import torch

from conftest import tiny_model
from headscope import formats
from headscope.cli import main
from headscope.errors import HeadscopeError
from headscope.model import HeadModel
from headscope.scores import HeadScores


@pytest.fixture(scope="module")
def llama():
    return HeadModel(tiny_model("llama"))  # 2 layers x 4 query heads, 2 KV heads


@pytest.fixture()
def scores():
    s = torch.tensor([[0.10, 0.70, 0.25, 0.05], [0.90, 0.30, 0.60, 0.20]])
    return HeadScores(s, "retrieval", "tiny", {"trials": 3})


def _prov(llama):
    return formats.provenance(llama, task="needle", prompt_set_sha256="ab" * 32, seed=7)


def test_provenance_fields(llama):
    prov = _prov(llama)
    assert set(prov) == {"model", "weights_sha256", "transformers_version", "headscope_version", "task",
                         "prompt_set_sha256", "seed"}
    assert prov["weights_sha256"] == formats.weights_sha256(llama.model) and len(prov["weights_sha256"]) == 64
    other = HeadModel(tiny_model("llama", seed=1))
    assert formats.weights_sha256(other.model) != prov["weights_sha256"]


def test_duo_round_trip(llama, scores, tmp_path):
    files = formats.export(scores, "duo", tmp_path / "pat", prov=_prov(llama), n_kv_heads=2, rule="mean", sink=4, recent=64)
    config = json.loads((tmp_path / "pat" / "config.json").read_text())
    assert (config["sink_size"], config["recent_size"]) == (4, 64)
    assert "mean" in config["headscope"]["kv_rule"] and config["headscope"]["provenance"]["seed"] == 7
    side = json.loads(files[-1].read_text())
    assert side["provenance"]["weights_sha256"] == formats.weights_sha256(llama.model) and "mean" in side["kv_rule"]
    back = formats.read_scores(tmp_path / "pat", (2, 4), 2, kv_level=True)
    want = torch.tensor([[0.40, 0.15], [0.60, 0.40]])  # mean of each pair of query heads, by hand
    assert torch.allclose(back.scores, want, atol=1e-7)
    assert back.params["sink_size"] == 4
    # query-head view: each KV score on its two query heads
    assert torch.allclose(formats.read_scores(tmp_path / "pat", (2, 4), 2).scores, want.repeat_interleave(2, 1))
    # the binary form: the top quarter of KV heads = 1.0
    formats.export(scores, "duo", tmp_path / "bin", prov=_prov(llama), n_kv_heads=2, rule="max", full_share=0.25)
    binary = formats.read_scores(tmp_path / "bin" / formats.DUO_TSV, (2, 4), 2, kv_level=True).scores
    assert binary.tolist() == [[0.0, 0.0], [1.0, 0.0]]  # max 0.9 is layer 1's first group


def test_retrieval_head_round_trip(llama, scores, tmp_path):
    out = tmp_path / "heads.json"
    formats.export(scores, "retrieval-head", out, prov=_prov(llama), n_kv_heads=2)
    data = json.loads(out.read_text())
    assert data["1-0"] == [pytest.approx(0.9)] and len(data) == 8
    back = formats.read_scores(out, (2, 4))
    assert torch.allclose(back.scores, scores.scores)
    assert back.top(3) == scores.top(3)
    assert json.loads((tmp_path / "heads.json.headscope.json").read_text())["provenance"]["task"] == "needle"


def test_qrhead_round_trip(llama, scores, tmp_path):
    out = tmp_path / "heads.yaml"
    formats.export(scores, "qrhead", out, prov=_prov(llama), n_kv_heads=2, top=3)
    text = out.read_text()
    assert 'attn_head_set: "1-0,0-1,1-2"' in text and "# weights_sha256:" in text
    back = formats.read_scores(out, (2, 4))
    assert back.top(3) == [(1, 0), (0, 1), (1, 2)] == scores.top(3)
    assert int((~torch.isnan(back.scores)).sum()) == 3


def test_published_files_load(tmp_path):
    """Files written the way the authors' repositories publish them."""
    duo = tmp_path / "duo"
    duo.mkdir()
    (duo / "full_attention_heads.tsv").write_text(
        "-9.584426879882812500e-05\t5.585937500000000000e-01\n1.000000000000000000e+00\t7.812500000000000000e-01\n")
    (duo / "config.json").write_text(json.dumps({"model_name": "models/x", "sink_size": 128, "recent_size": 256,
                                                 "threshold": 0.5, "lr": 0.02}))
    d = formats.read_scores(duo, (2, 4), 2, kv_level=True)
    assert d.scores[1, 0].item() == 1.0 and d.params["recent_size"] == 256
    rh = tmp_path / "llama-2-7b-80k.json"
    rh.write_text(json.dumps({"0-0": [0, 0, 0, 0], "0-1": [0, 0.5, 1, 0.5], "1-3": [1, 1, 0, 1], "1-2": [0, 0, 0, 0]}))
    r = formats.read_scores(rh, (2, 4))
    assert r.scores[0, 1].item() == 0.5 and r.scores[1, 3].item() == 0.75 and torch.isnan(r.scores[0, 2])
    qr = tmp_path / "Llama-3.1-8B-Instruct_qr_head.yaml"
    qr.write_text("model_name_or_path: meta-llama/Llama-3.1-8B-Instruct\nmodel_base_class: Llama-3.1-8B-Instruct\n"
                  "attn_head_set: \"1-2,0-3,1-0\"  # top heads\n")
    assert formats.read_scores(qr, (2, 4)).top(3) == [(1, 2), (0, 3), (1, 0)]


def test_shape_mismatch_names_both_shapes(tmp_path):
    tsv = tmp_path / "full_attention_heads.tsv"
    tsv.write_text("1\t0\n0\t1\n1\t1\n")
    with pytest.raises(HeadscopeError, match=r"3 layers x 2 KV heads; this model has 2 layers x 4 query heads \(2 KV"):
        formats.read_scores(tsv, (2, 4), 2, kv_level=True)
    rh = tmp_path / "h.json"
    rh.write_text(json.dumps({"0-0": [1], "5-1": [1]}))
    with pytest.raises(HeadscopeError, match=r"\(6 x 2\); this model has 2 layers x 4 query heads"):
        formats.read_scores(rh, (2, 4), 2)
    bad = tmp_path / "b.json"
    bad.write_text(json.dumps({"zero-one": [1]}))
    with pytest.raises(HeadscopeError, match="LAYER-HEAD"):
        formats.read_scores(bad)


def test_export_cli_bad_format_before_loading(capsys, tmp_path):
    assert main(["export", "r.csv", "--format", "safetensors", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "safetensors" in err and len(err.splitlines()) == 1
    assert main(["export", str(tmp_path / "r.csv"), "--format", "retrieval-head", "--out", str(tmp_path / "r.json")]) == 2
    assert "sidecar of input" in capsys.readouterr().err


@pytest.fixture(scope="module")
def organism_files(tmp_path_factory):
    """The retrieval organism's own ranking, exported in each format."""
    d = tmp_path_factory.mktemp("org")
    assert main(["score", "--task", "needle", "--lengths", "128", "--depths", "50", "--quiet",
                 "--out", str(d / "r.csv")]) == 0
    for fmt, name in (("duo", "duo"), ("retrieval-head", "heads.json"), ("qrhead", "heads.yaml")):
        assert main(["export", str(d / "r.csv"), "--format", fmt, "--out", str(d / name)]) == 0
    return d


def test_published_files_drive_kv_compress_ablate_decore(organism_files, capsys):
    d = organism_files
    capsys.readouterr()
    lines = {}
    for name in ("r.csv", "duo", "heads.json", "heads.yaml"):
        assert main(["eval", "--task", "needle", "--lengths", "128", "--depths", "50", "--quiet", "--kv-compress",
                     str(d / name), "--full-share", "0.25", "--recent", "16"]) == 0
        out = capsys.readouterr().out.strip().splitlines()
        assert out[-3].startswith("kv_bytes_held: ") and out[-2].startswith("kv_bytes_full: ")
        assert out[-1].startswith("accuracy: ")
        lines[name] = out[-3:]
    held, full = int(lines["r.csv"][0].split()[1]), int(lines["r.csv"][1].split()[1])
    assert held < full
    # the same ranking in CSV, Retrieval_Head JSON and QRHead YAML keeps the same full KV heads (rule "any")
    assert lines["r.csv"] == lines["heads.json"] == lines["heads.yaml"]
    assert main(["eval", "--task", "needle", "--lengths", "128", "--depths", "50", "--quiet",
                 "--ablate", str(d / "heads.json"), "--top", "2"]) == 0
    assert "the top 2 heads of" in capsys.readouterr().out
    assert main(["generate", "--prompt", "The secret number", "--max-new-tokens", "3",
                 "--decore", str(d / "heads.yaml"), "--top", "2"]) == 0
    assert "DeCoRe, masking" in capsys.readouterr().out


def test_kv_compress_random_heads_and_bad_input(organism_files, capsys):
    d = organism_files
    capsys.readouterr()
    assert main(["eval", "--task", "needle", "--lengths", "128", "--depths", "50", "--quiet", "--kv-compress",
                 str(d / "r.csv"), "--full-share", "0.5", "--recent", "16", "--random-heads", "--draws", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("draw ") == 3 and "95 % bootstrap interval" in out
    for bad, msg in ((["--full-share", "1.2"], "full-share"), (["--sink", "-2"], ">= 0"),
                     (["--recent", "500"], "longer than the context")):
        assert main(["eval", "--task", "needle", "--lengths", "128", "--kv-compress", str(d / "r.csv"), *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and msg in err and len(err.splitlines()) == 1


def test_generate_refuses_a_window_longer_than_the_prompt_before_loading(organism_files, capsys, monkeypatch):
    """generate's context is its prompt: measured with the tokenizer alone, before any model loads."""
    from headscope.model import HeadModel

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(HeadModel, "load", no_load)
    capsys.readouterr()
    code = main(["generate", "--prompt", "The secret number", "--kv-compress", str(organism_files / "r.csv"),
                 "--sink", "4", "--recent", "64"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and "longer than the context" in err and len(err.splitlines()) == 1
