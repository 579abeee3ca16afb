"""Head pursuit: SOMP on a hand-built example; head writes; a planted concept head is found."""

import random

import pytest
import torch
from conftest import tiny_model

from headscope.analyzers import pursuit
from headscope.errors import HeadscopeError
from headscope.model import HeadModel


def test_somp_recovers_known_atoms_with_full_evr():
    g = torch.Generator().manual_seed(0)
    D = torch.randn(40, 64, generator=g)
    support = [3, 17, 25]
    coef = torch.randn(20, 3, generator=g) * torch.tensor([5.0, 3.0, 1.0])
    X = coef @ D[support] + torch.randn(64, generator=g)  # a common offset: removed by centring
    chosen, evr = pursuit.somp(X, D, k=3)
    assert set(chosen) == set(support)
    assert evr == pytest.approx(1.0, abs=1e-9)
    # fewer atoms than the support: EVR strictly between 0 and 1; more than the dictionary: capped
    _, partial = pursuit.somp(X, D, k=1)
    assert 0 < partial < 1
    chosen_all, _ = pursuit.somp(X, D[:5], k=50)
    assert sorted(chosen_all) == [0, 1, 2, 3, 4]
    # logit lens = 1 sample, 1 step: the atom with the largest |<x, atom>| (X uncentred by hand here)
    x = torch.randn(2, 64, generator=g)
    first, _ = pursuit.somp(x, D, k=1)
    assert first == [int(((x - x.mean(0)) @ D.T).abs().sum(0).argmax())]
    # normalisation changes the choice when atom norms differ
    Dn = D.clone()
    Dn[7] *= 100
    assert pursuit.somp(X, Dn, k=1)[0] == [7]
    assert pursuit.somp(X, Dn, k=1, normalize=True)[0] != [7]
    with pytest.raises(HeadscopeError, match="SOMP needs"):
        pursuit.somp(X, D[:, :10])


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_output_weights_reproduce_the_projection(kind):
    model = tiny_model(kind)
    hm = HeadModel(model)
    z = torch.randn(3, 4 * 16)
    proj = hm._layers[1].out_proj
    per_head = torch.einsum("bhd,hdm->bm", z.view(3, 4, 16), pursuit.output_weights(hm, 1))
    bias = proj.bias if getattr(proj, "bias", None) is not None else 0
    torch.testing.assert_close(per_head + bias, proj(z), atol=1e-5, rtol=1e-5)


def planted_model(concept, head=(1, 2), scale=40.0):
    """Tiny GPT-2 whose head (1, 2) writes only inside the span of the concept's unembedding rows."""
    model = tiny_model("gpt2")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        U = model.lm_head.weight[concept]  # tied with wte: [c, d_model]
        W = model.transformer.h[head[0]].attn.c_proj.weight  # Conv1D [H*d, d_model]
        W[head[1] * 16 : (head[1] + 1) * 16] = scale * torch.randn(16, len(concept), generator=g) @ U / U.norm()
    return model


def test_pursuit_ranks_the_planted_concept_head_first_and_editing_it_matters():
    concept = [10, 11, 12, 13]
    model = planted_model(concept)
    hm = HeadModel(model)
    rng = random.Random(0)
    prompts = [[rng.randrange(20, 128) for _ in range(12)] for _ in range(8)]
    scores = pursuit.head_pursuit(hm, prompts, concept, k=4, progress=False)
    assert scores.top(1) == [(1, 2)]
    assert scores.scores[1, 2] == pytest.approx(1.0, abs=1e-6)  # its writes lie in the atoms' span
    assert scores.scores.flatten().sort().values[-2] < 0.9
    # verified by ablation: zeroing the planted head moves the concept probability most
    base = pursuit.concept_probability(hm, prompts, concept)
    change = {}
    for h in hm.all_heads():
        with hm.ablate([h]):
            change[h] = abs(pursuit.concept_probability(hm, prompts, concept) - base)
    assert max(change, key=change.get) == (1, 2)
    effect = pursuit.edit_effect(hm, prompts, concept, scores, alpha=5.0, top=1, draws=3)
    assert effect["heads"] == [(1, 2)]
    assert abs(effect["edited"] - base) > abs(effect["random_mean"] - base)
    assert not hm.hooks_installed()


def test_same_layer_controls_and_errors():
    rng = random.Random(0)
    heads = [(0, 1), (1, 2), (1, 3)]
    rand = pursuit.same_layer_random_heads(heads, 4, rng)
    assert sorted(h[0] for h in rand) == [0, 1, 1] and not set(rand) & set(heads)
    hm = HeadModel(tiny_model("gpt2"))
    with pytest.raises(HeadscopeError, match="at least 2 prompts"):
        pursuit.head_pursuit(hm, [[1, 2, 3]], [5])


def test_cli_pursuit(tmp_path, capsys):
    import transformers as tf

    from headscope.cli import main
    from headscope.scores import HeadScores
    from headscope.zoo.training import build_word_tokenizer

    texts = ["the red fox runs to the blue lake", "a green tree stands by the old road", "the small boat is red"]
    tok = build_word_tokenizer(texts)
    torch.manual_seed(0)
    tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id)).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "prompts.txt").write_text("\n".join(texts) + "\n")
    (tmp_path / "colors.txt").write_text("red\nblue\ngreen\n")
    out = tmp_path / "p.csv"
    assert main(["score", "--task", "pursuit", "--model", str(tmp_path / "m"), "--concept", str(tmp_path / "colors.txt"),
                 "--text", str(tmp_path / "prompts.txt"), "--edit-alpha", "5", "--edit-top", "1", "--out", str(out),
                 "--quiet"]) == 0
    scores = HeadScores.from_csv(out)
    assert scores.method == "head_pursuit" and scores.params["k"] == 3
    assert ((scores.scores >= 0) & (scores.scores <= 1 + 1e-6)).all()
    assert "concept probability" in capsys.readouterr().out
    assert main(["score", "--task", "pursuit", "--model", str(tmp_path / "m"), "--concept", str(tmp_path / "none.txt")]) == 2
