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


def test_concept_ids_leave_out_unknown_words_and_special_tokens():
    from headscope.zoo.training import build_word_tokenizer

    tok = build_word_tokenizer(["red blue green the cat"])
    red, blue = tok.convert_tokens_to_ids(["red", "blue"])
    assert pursuit.concept_token_ids(tok, ["red", "zebra", "blue", ""]) == sorted([red, blue])  # no <unk>
    with pytest.raises(HeadscopeError, match="vocabulary"):
        pursuit.concept_token_ids(tok, ["zebra", "okapi"])
    with pytest.raises(HeadscopeError, match="no words"):
        pursuit.concept_token_ids(tok, ["", "  "])


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_batched_concept_probability_equals_one_prompt_at_a_time(kind):
    hm = HeadModel(tiny_model(kind))
    rng = random.Random(1)
    prompts = [[rng.randrange(128) for _ in range(rng.randint(3, 20))] for _ in range(7)]
    concept = [5, 6, 7]
    alone = [pursuit.concept_probability(hm, [p], concept) for p in prompts]
    assert pursuit.concept_probability(hm, prompts, concept, batch_size=3) == pytest.approx(sum(alone) / 7, abs=1e-6)


# ------------------------------------------------------------------ the topics organism (trained)
TOPICS = ("colors", "animals", "numbers")


@pytest.fixture(scope="module")
def topics():
    """The shipped topics organism, its ground truth and held-out prompts per concept (a seed
    the ground truth did not use)."""
    import pandas as pd

    from headscope.zoo import ground_truth_path, organism_info
    from headscope.zoo import train_topics as T

    hm = HeadModel.load("topics")
    truth = pd.read_csv(ground_truth_path("topics"))
    data = {c: ([hm.tokenizer(t)["input_ids"] for t in T.concept_prompts(c, 32, seed=11)], T.concept_ids(hm.tokenizer, c))
            for c in TOPICS}
    return hm, truth, data, organism_info("topics")


def test_topics_concepts_are_not_saturated_and_have_a_writer_head(topics):
    """Each concept's probability sits inside (0, 1) and one head's ablation drops it clearly."""
    hm, truth, data, info = topics
    for c in TOPICS:
        base = pursuit.concept_probability(hm, *data[c])
        assert 0.15 < base < 0.4, (c, base)
        assert base == pytest.approx(info["base_probability"][c], abs=0.05)
        assert truth[f"change_{c}"].min() < -0.05, (c, truth[f"change_{c}"].min())


@pytest.mark.parametrize("concept", TOPICS)
def test_pursuit_ranks_first_the_head_whose_ablation_removes_the_concept(topics, concept):
    hm, truth, data, _ = topics
    prompts, ids = data[concept]
    scores = pursuit.head_pursuit(hm, prompts, ids, progress=False)
    assert scores.top(1) == [writer(truth, concept)], (concept, scores.top(3), truth.to_dict("records"))


@pytest.fixture(scope="module")
def topic_edits(topics):
    """Per concept: edit_effect of the top pursuit heads (k = 1% of 8 heads, rounded up: 1) with
    alpha -1 and 5, against 10 draws of random heads with the same per-layer counts."""
    hm, _, data, _ = topics
    out = {}
    for c in TOPICS:
        prompts, ids = data[c]
        scores = pursuit.head_pursuit(hm, prompts, ids, progress=False)
        out[c] = {alpha: pursuit.edit_effect(hm, prompts, ids, scores, alpha=alpha, draws=10) for alpha in (-1.0, 5.0)}
    assert not hm.hooks_installed()
    return out


@pytest.mark.parametrize("concept", TOPICS)
def test_suppressing_the_top_pursuit_head_lowers_the_concept_far_more_than_random_heads(topic_edits, concept):
    down = topic_edits[concept][-1.0]
    assert len(down["heads"]) == 1
    base = down["base"]
    assert down["edited"] < base - 0.1, down
    assert base - down["edited"] > 5 * abs(base - down["random_mean"]), down


@pytest.mark.parametrize("concept", TOPICS)
def test_enhancing_the_top_pursuit_head_raises_the_concept(topic_edits, concept):
    up = topic_edits[concept][5.0]
    assert up["edited"] > up["base"] + 0.02, up


@pytest.mark.parametrize("concept", [
    pytest.param("colors", marks=pytest.mark.xfail(strict=True, reason=(
        "measured: base 0.260, top head (1, 0) x5 0.304, same-layer random heads x5 0.283 +- 0.046: the "
        "layer-1 MLP saturates the head's effect, so enhancing raises the concept only a little more than "
        "enhancing other heads"))),
    "animals", "numbers"])
def test_enhancing_the_top_pursuit_head_raises_the_concept_far_more_than_random_heads(topic_edits, concept):
    """Random heads' raise (random mean - base, 0 when they lower it) is at most a third of the top head's."""
    up = topic_edits[concept][5.0]
    assert up["edited"] - up["base"] > 3 * max(0.0, up["random_mean"] - up["base"]), up


def test_cli_pursuit_on_the_topics_organism(topics, tmp_path):
    """Default prompts: the organism's shipped prompts.txt; the shipped concept file for colours."""
    from headscope.cli import main
    from headscope.data import dataset_path
    from headscope.scores import HeadScores

    _, truth, _, info = topics
    assert info["concepts"]["colors"]["words"] == pursuit_words(dataset_path("concept_colors.txt"))
    out = tmp_path / "colors.csv"
    assert main(["score", "--task", "pursuit", "--model", "topics", "--concept", str(dataset_path("concept_colors.txt")),
                 "--out", str(out), "--quiet"]) == 0
    scores = HeadScores.from_csv(out)
    assert scores.top(1) == [writer(truth, "colors")]
    assert scores.params["samples"] == 64 and scores.params["concept_tokens"] == 8


def writer(truth, concept):
    """The head whose ablation alone lowers the concept's probability most (ground truth)."""
    row = truth.loc[truth[f"change_{concept}"].idxmin()]
    return int(row["layer"]), int(row["head"])


def pursuit_words(path):
    return [w.strip() for w in path.read_text().splitlines() if w.strip()]


@pytest.mark.slow
def test_topics_ground_truth_reproduces():
    """Re-measuring every single-head ablation gives the shipped ground_truth.csv."""
    import pandas as pd

    from headscope.zoo import ground_truth_path, organism_info
    from headscope.zoo import train_topics as T

    hm = HeadModel.load("topics")
    hp = organism_info("topics")["training"]
    measured, _ = T.ground_truth(hm, hp["hyperparameters"]["heldout"], seed=hp["seed"] + 1, rate=hp["hyperparameters"]["rate"])
    shipped = pd.read_csv(ground_truth_path("topics"))
    pd.testing.assert_frame_equal(measured, shipped, check_exact=False, atol=2e-4, rtol=0, check_dtype=False)
