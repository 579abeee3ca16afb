"""Attention sinks: kernel-backed scores equal eager attention; MiniLM's measured sinks."""

import pytest
import torch
from conftest import tiny_model

from headscope.analyzers import sinks
from headscope.errors import HeadscopeError
from headscope.model import HeadModel


def eager_pattern(model, ids):
    impl = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return torch.stack(model(input_ids=torch.tensor([ids]), output_attentions=True).attentions)[:, 0]
    finally:
        model.set_attn_implementation(impl)


def eager_alpha(pattern, causal):
    """alpha[l,h,k] = mean over queries that see k of A[i,k], by hand from the full pattern."""
    n = pattern.shape[-1]
    if causal:
        return torch.stack([pattern[..., k:, k].mean(-1) for k in range(n)], dim=-1)
    return pattern.mean(-2)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_sink_alpha_and_mass_equal_eager(kind):
    model = tiny_model(kind)
    hm = HeadModel(model)
    ids = torch.randint(0, 128, (20,), generator=torch.Generator().manual_seed(0)).tolist()
    pattern = eager_pattern(model, ids)
    alpha = sinks.sink_alpha(hm, ids)
    torch.testing.assert_close(alpha, eager_alpha(pattern, True), atol=1e-5, rtol=0)
    # the first key is seen by every query, the last only by itself
    torch.testing.assert_close(alpha[..., -1], pattern[..., -1, -1], atol=1e-5, rtol=0)
    mass = sinks.sink_mass(hm, ids, [0, 3])
    torch.testing.assert_close(mass, pattern[..., [0, 3]].sum(-1).mean(-1), atol=1e-5, rtol=0)
    report = sinks.attention_sinks(hm, [ids], eps=0.3)
    ref = eager_alpha(pattern, True)
    assert report.first_token_share == pytest.approx(float((ref[..., 0] > 0.3).float().mean()))
    assert len(report.table) == int((ref > 0.3).sum())
    assert not hm.hooks_installed()


def test_minilm_sinks(minilm_path):
    """Measured on all-MiniLM-L6-v2: [CLS] is the sink from layer 1 on; [SEP] never is."""
    hm = HeadModel.load(minilm_path)
    texts = ["The cat sat on the mat.",
             "Attention heads in a small encoder model, trained on sentence pairs, look at punctuation.",
             "Paris is the capital of France; Berlin is the capital of Germany."]
    report = sinks.attention_sinks(hm, texts, eps=0.3)
    # cross-check every alpha against eager attention (bidirectional: all queries)
    for text, alpha in zip(texts, report.alphas):
        ids = hm.tokenizer(text)["input_ids"]
        torch.testing.assert_close(alpha, eager_alpha(eager_pattern(hm.model, ids), False), atol=1e-5, rtol=0)
    by_layer = report.sink_tokens_by_layer()
    cls = by_layer[by_layer.token == "[CLS]"].set_index("layer")["heads"]
    assert set(cls.index) == {0, 1, 2, 3, 4, 5}
    assert (cls.loc[1:4] >= 30).all()  # >= 30 of 36 (text, head) pairs in layers 1-4
    assert "[SEP]" not in set(by_layer.token)
    assert 0.7 < report.first_token_share < 0.9  # measured 0.79
    first = report.first_token.scores
    assert first[1:5].mean() > 0.5 > first[0].mean()  # layer 0 spreads its attention
    mass = report.mass_on_sinks.scores
    assert (mass >= first - 1e-5).all()  # the sink group contains the first token
    assert sinks.massive_activations(hm, texts).empty  # MiniLM has no |h| > 100 entries


def test_massive_activations_and_visual_sinks_find_an_injected_spike():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[7, 11] = 3000.0  # token 7 carries a massive dim 11
    hm = HeadModel(model)
    ids = [1, 2, 7, 4, 5, 7, 9]
    found = sinks.massive_activations(hm, [ids])
    assert set(found.position) == {2, 5} and sinks.massive_dims(found) == [11]
    # residual inputs of layers 0 and 1 carry it; HF's last hidden state is after the final RMSNorm
    assert set(found.layer) == {0, 1}
    # phi by hand: a single spike of size s among d dims gives |s| / sqrt(s^2 / d) ~ sqrt(d) = 8
    result = sinks.visual_sinks(hm, ids, sinks.massive_dims(found), tau=7.0)
    assert result == {}  # the tiny model has 2 layers: no layer >= 2 has a residual input
    result = sinks.visual_sinks(hm, ids, [11], tau=7.0, first_layer=0)
    assert result == {0: [2, 5], 1: [2, 5]}
    assert sinks.visual_sinks(hm, ids, [11], tau=20.0, first_layer=0) == {0: [], 1: []}
    with pytest.raises(HeadscopeError, match="massive"):
        sinks.visual_sinks(hm, ids, [])


def test_secondary_sinks_repeat_of_first_token_is_sink_like():
    model = tiny_model("llama")
    hm = HeadModel(model)
    ids = [3, 8, 9, 10, 11]
    states = sinks.hidden_states(hm, ids)[1:]
    cos = torch.nn.functional.cosine_similarity(states, states[:, :1], dim=-1).abs()
    table = sinks.secondary_sinks(hm, [ids], cos_threshold=0.5, min_lifetime=1, primary_margin=0)
    expected = {p: int((cos[:, p] > 0.5).sum()) for p in range(1, 5) if (cos[:, p] > 0.5).any()}
    assert dict(zip(table.position, table.lifetime)) == expected
    # L = 2, margin 0: primary needs all 2 layers, secondary 1 layer (min_lifetime=1)
    assert dict(zip(table.position, table["class"])) == {
        p: "primary" if life == 2 else "secondary" for p, life in expected.items()}
    assert expected  # this seed has at least one sink-like token at threshold 0.5
    with pytest.raises(HeadscopeError, match="fewer than 2"):
        sinks.attention_sinks(hm, [[5]])


def test_cli_sinks_on_minilm(minilm_path, tmp_path, capsys):
    from headscope.cli import main
    from headscope.scores import HeadScores

    (tmp_path / "t.txt").write_text("The cat sat on the mat.\nParis is the capital of France.\n")
    out = tmp_path / "sinks.csv"
    assert main(["score", "--task", "sinks", "--model", minilm_path, "--text", str(tmp_path / "t.txt"),
                 "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "'[CLS]'" in text and "first token is a sink" in text
    scores = HeadScores.from_csv(out)
    hm = HeadModel.load(minilm_path)
    expected = sinks.attention_sinks(hm, ["The cat sat on the mat.", "Paris is the capital of France."]).first_token
    torch.testing.assert_close(scores.scores, expected.scores, atol=1e-6, rtol=0)
    assert scores.heatmap().data[0].z.shape == (6, 12)
    assert main(["score", "--task", "sinks", "--model", minilm_path, "--text", str(tmp_path / "missing.txt")]) == 2
