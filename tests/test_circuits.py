"""Circuits: batched patching equals one-head-at-a-time references; overlap arithmetic; task data."""

import json

import pytest
import torch
from conftest import tiny_model

from headscope.analyzers import circuits
from headscope.errors import HeadscopeError
from headscope.model import HeadModel
from headscope.tasks.circuit_pairs import CircuitPair, EncodedPairs, encode_pairs, load_pairs, save_pairs
from headscope.tasks.colored_objects import colored_objects_pairs
from headscope.tasks.ioi import ioi_pairs


def random_pairs(seed=0, P=3, N=10, V=128):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, V, (P, N), generator=g)
    corrupt = clean.clone()
    corrupt[:, 3] = torch.randint(0, V, (P,), generator=g)  # one token differs, like IOI's S2
    answer, wrong = torch.randint(0, V, (P,), generator=g), torch.randint(0, V, (P,), generator=g)
    return EncodedPairs(clean, corrupt, answer, wrong)


def head_slice(model, layer):
    """The output-projection module of a layer (GPT-2 c_proj / Llama o_proj), for the references."""
    blocks = model.transformer.h if hasattr(model, "transformer") else model.model.layers
    return blocks[layer].attn.c_proj if hasattr(model, "transformer") else blocks[layer].self_attn.o_proj


def z_of(model, ids, n_layers):
    zs = {}
    handles = [head_slice(model, l).register_forward_pre_hook(
        lambda m, a, l=l: zs.__setitem__(l, a[0].detach().clone())) for l in range(n_layers)]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in handles:
            h.remove()
    return zs


def patched_metric(model, pairs, layer, head, d, z_corrupt, position=None):
    """Reference: a plain pre-hook replacing one head's slice of the o_proj input."""
    def hook(m, args):
        z = args[0].clone()
        cols = slice(head * d, (head + 1) * d)
        if position is None:
            z[..., cols] = z_corrupt[..., cols]
        else:
            z[:, position, cols] = z_corrupt[:, position, cols]
        return (z,)
    handle = head_slice(model, layer).register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            return circuits.logit_diff(model(pairs.clean).logits, pairs.answer, pairs.wrong).mean().item()
    finally:
        handle.remove()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_activation_patching_equals_one_head_reference(kind):
    model = tiny_model(kind)
    hm = HeadModel(model)
    pairs = random_pairs()
    scores = circuits.activation_patching(hm, [pairs], heads_per_batch=3, progress=False)
    clean, corrupt = circuits.baseline(hm, [pairs])
    zc = z_of(model, pairs.corrupt, 2)
    d = hm.geometry.head_dim
    for layer, head in hm.all_heads():
        patched = patched_metric(model, pairs, layer, head, d, zc[layer])
        assert scores.scores[layer, head].item() == pytest.approx((clean - patched) / (clean - corrupt), abs=1e-4)
    assert not hm.hooks_installed()


def test_attribution_patching_equals_hand_gradient():
    model = tiny_model("gpt2")
    hm = HeadModel(model)
    pairs = random_pairs(1)
    scores = circuits.attribution_patching(hm, [pairs])
    clean, corrupt = circuits.baseline(hm, [pairs])
    zc = z_of(model, pairs.corrupt, 2)
    d = hm.geometry.head_dim
    # reference: leaf z per layer via plain hooks, autograd by hand
    leaves = {}

    def make(l):
        def hook(m, args):
            z = args[0].detach().clone().requires_grad_(True) if l == 0 else args[0]
            if l != 0:
                z.retain_grad()
            leaves[l] = z
            return (z,)
        return hook
    handles = [head_slice(model, l).register_forward_pre_hook(make(l)) for l in range(2)]
    try:
        metric = circuits.logit_diff(model(pairs.clean).logits, pairs.answer, pairs.wrong).mean()
        metric.backward()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    for layer in range(2):
        prod = (leaves[layer].grad * (zc[layer] - leaves[layer].detach())).view(*zc[layer].shape[:2], 4, d)
        expected = -prod.sum(dim=(0, 1, 3)) / (clean - corrupt)
        torch.testing.assert_close(scores.scores[layer], expected.float(), atol=1e-5, rtol=1e-4)
    assert all(p.grad is None for p in model.parameters())


def test_eap_ig_equals_hand_integrated_gradient():
    """EAP-IG (Hanna et al. 2024) by hand: plain hooks make every layer's z a leaf, the gradient of
    the mean metric is averaged over inputs_embeds = corrupt + k/3 (clean - corrupt), k = 1..3, and
    multiplied by z_corrupt - z_clean. steps=1 is plain attribution patching, bit for bit."""
    model = tiny_model("llama")
    hm = HeadModel(model)
    pairs = random_pairs(4)
    plain = circuits.attribution_patching(hm, [pairs])
    assert torch.equal(circuits.attribution_patching(hm, [pairs], steps=1).scores, plain.scores)
    ig = circuits.attribution_patching(hm, [pairs], steps=3)
    assert ig.params["steps"] == 3
    clean, corrupt = circuits.baseline(hm, [pairs])
    zc, z_clean = z_of(model, pairs.corrupt, 2), z_of(model, pairs.clean, 2)
    embed = model.get_input_embeddings()
    e_clean, e_corrupt = embed(pairs.clean).detach(), embed(pairs.corrupt).detach()
    grads = {0: 0.0, 1: 0.0}
    for k in (1, 2, 3):
        leaves = {}

        def make(l):
            def hook(m, args):
                leaves[l] = args[0].detach().clone().requires_grad_(True)
                return (leaves[l],)
            return hook
        # a leaf z in every layer cuts the graph between layers: differentiate layer by layer instead
        for layer in range(2):
            handle = head_slice(model, layer).register_forward_pre_hook(make(layer))
            try:
                x = e_corrupt + k / 3 * (e_clean - e_corrupt)
                metric = circuits.logit_diff(model(inputs_embeds=x).logits, pairs.answer, pairs.wrong).mean()
                grads[layer] = grads[layer] + torch.autograd.grad(metric, leaves[layer])[0]
            finally:
                handle.remove()
    d = hm.geometry.head_dim
    for layer in range(2):
        prod = (grads[layer] / 3 * (zc[layer] - z_clean[layer])).view(*zc[layer].shape[:2], 4, d)
        expected = -prod.sum(dim=(0, 1, 3)) / (clean - corrupt)
        torch.testing.assert_close(ig.scores[layer], expected.float(), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(ig.scores, plain.scores)  # the interpolation changes the estimate
    with pytest.raises(HeadscopeError, match="steps"):
        circuits.attribution_patching(hm, [pairs], steps=0)
    assert all(p.grad is None for p in model.parameters())


def test_path_patching_last_layer_sender_is_direct_effect():
    """A last-layer head reaches the logits only directly: path score = -100 x activation score
    of patching it at the last position."""
    model = tiny_model("gpt2")
    hm = HeadModel(model)
    pairs = random_pairs(2)
    path = circuits.path_patching(hm, [pairs], senders=[(1, h) for h in range(4)], heads_per_batch=2, progress=False)
    clean, corrupt = circuits.baseline(hm, [pairs])
    zc = z_of(model, pairs.corrupt, 2)
    for head in range(4):
        patched = patched_metric(model, pairs, 1, head, 16, zc[1], position=-1)
        expected = -(patched - clean) / (corrupt - clean) * 100
        assert path.scores[1, head].item() == pytest.approx(expected, rel=1e-5, abs=1e-3)
    assert torch.isnan(path.scores[0]).all()
    # through receivers: a sender in layer 0, receivers = all layer-1 heads, runs and is finite
    via = circuits.path_patching(hm, [pairs], senders=[(0, 0)], receivers=[(1, h) for h in range(4)], progress=False)
    assert torch.isfinite(via.scores[0, 0])


def test_path_patching_through_itself_equals_direct_for_last_layer():
    """Receivers = the last-layer sender itself: recording it and patching it back alone into a
    clean run is that head's own last-position patch, as is its direct path to the logits."""
    model = tiny_model("llama")
    hm = HeadModel(model)
    pairs = random_pairs(3)
    direct = circuits.path_patching(hm, [pairs], senders=[(1, 2)], progress=False)
    same = circuits.path_patching(hm, [pairs], senders=[(1, 2)], receivers=[(1, 2)], progress=False)
    # receivers = the sender itself: recording it and patching it back is the sender's own patch
    clean, corrupt = circuits.baseline(hm, [pairs])
    zc = z_of(model, pairs.corrupt, 2)
    patched = patched_metric(model, pairs, 1, 2, 16, zc[1], position=-1)
    expected = -(patched - clean) / (corrupt - clean) * 100
    assert direct.scores[1, 2].item() == pytest.approx(expected, rel=1e-5, abs=1e-3)
    assert same.scores[1, 2].item() == pytest.approx(expected, rel=1e-5, abs=1e-3)


def test_circuit_selection_and_overlap():
    s = torch.zeros(4, 5)
    s[0, 1], s[2, 3], s[3, 4], s[1, 0] = 5.0, -4.0, 3.0, 0.5
    hs = circuits.HeadScores(s, "x")
    assert circuits.circuit(hs, top_k=2) == {(0, 1), (2, 3)}
    assert circuits.circuit(hs, top_k=2, absolute=False) == {(0, 1), (3, 4)}
    assert circuits.circuit(hs, top_p=0.1) == {(0, 1), (2, 3)}  # ceil(0.1 * 20) = 2
    assert circuits.circuit(hs, threshold=1.0) == {(0, 1), (2, 3), (3, 4)}
    o = circuits.overlap({(0, 1), (2, 3), (3, 4)}, {(0, 1), (1, 1)})
    assert (o["shared"], o["share_of_a"], o["share_of_b"], o["jaccard"], o["overlap_coefficient"]) == (
        1, pytest.approx(1 / 3), 0.5, 0.25, 0.5)
    fig = circuits.overlap_figure({(0, 1)}, {(0, 1), (1, 1)}, 4, 5)
    assert fig.data[0].z[0][1] == 3 and fig.data[0].z[1][1] == 2
    with pytest.raises(HeadscopeError, match="top_p"):
        circuits.circuit(hs, top_p=0)


def word_tokenizer(pairs):
    from headscope.zoo.training import build_word_tokenizer
    return build_word_tokenizer([p.clean + " " + p.corrupt + p.answer + p.wrong for p in pairs])


def test_task_generators_and_jsonl(tmp_path):
    ioi = ioi_pairs(20, seed=1)
    assert ioi == ioi_pairs(20, seed=1)  # seeded
    for p in ioi:
        a, b = p.answer.strip(), p.wrong.strip()
        clean, corrupt = p.clean.replace(",", " ,").split(), p.corrupt.replace(",", " ,").split()
        diff = [i for i, (x, y) in enumerate(zip(clean, corrupt)) if x != y]
        assert len(clean) == len(corrupt) and len(diff) == 1  # only the repeated subject (S2) changes
        assert clean[diff[0]] == b and clean.count(b) == 2 and clean.count(a) == 1 and corrupt.count(b) == 1
    objs = colored_objects_pairs(10, seed=2)
    for p in objs:
        assert p.clean != p.corrupt and p.answer != p.wrong
        assert p.clean.rsplit("What color is the ", 1)[0] == p.corrupt.rsplit("What color is the ", 1)[0]
    tok = word_tokenizer(ioi + objs)
    groups = encode_pairs(tok, ioi + objs)
    assert sum(len(g) for g in groups) == 30
    for g in groups:
        assert g.clean.shape == g.corrupt.shape and (g.answer != g.wrong).all()
    path = save_pairs(ioi[:3], tmp_path / "pairs.jsonl")
    assert load_pairs(path) == ioi[:3]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"clean": "a"}) + "\n")
    with pytest.raises(HeadscopeError, match="corrupt"):
        load_pairs(bad)
    with pytest.raises(HeadscopeError, match="tokens; they must match"):
        encode_pairs(tok, [CircuitPair("Mary and John", "Mary and John and", " Mary", " John")])
    assert len(encode_pairs(tok, [CircuitPair("Mary and John", "Mary and John and", " Mary", " John")] + ioi[:1],
                            drop_mismatched=True)[0]) == 1
    hm = HeadModel(tiny_model("gpt2"))
    same = random_pairs()
    same.corrupt = same.clean
    with pytest.raises(HeadscopeError, match="same logit difference"):
        circuits.activation_patching(hm, [same], progress=False)


def saved_tiny_lm(tmp_path, texts):
    """A random-init GPT-2 with a word tokenizer over ``texts``, saved as a model folder."""
    import transformers as tf

    from headscope.zoo.training import build_word_tokenizer

    tok = build_word_tokenizer(texts)
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=len(tok), n_positions=256,
                                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    path = tmp_path / "tiny"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_cli_circuit_and_overlap(tmp_path, capsys):
    from headscope.cli import main

    ioi = ioi_pairs(8)
    path = saved_tiny_lm(tmp_path, [p.clean + " " + p.corrupt + p.answer + p.wrong for p in ioi])
    save_pairs(ioi, tmp_path / "ioi.jsonl")
    for method in ("activation", "attribution", "path"):
        out = tmp_path / f"{method}.csv"
        assert main(["score", "--task", "circuit", "--model", path, "--pairs", str(tmp_path / "ioi.jsonl"),
                     "--method", method, "--out", str(out), "--quiet"]) == 0
        assert circuits.HeadScores.from_csv(out).method == f"{method}_patching"
    assert main(["score", "--task", "circuit", "--model", path, "--pairs", str(tmp_path / "ioi.jsonl"),
                 "--method", "attribution", "--ig-steps", "3", "--out", str(tmp_path / "ig.csv"), "--quiet"]) == 0
    assert circuits.HeadScores.from_csv(tmp_path / "ig.csv").params["steps"] == 3
    assert main(["overlap", str(tmp_path / "activation.csv"), str(tmp_path / "attribution.csv"), "--top", "3",
                 "--plot", str(tmp_path / "o.html")]) == 0
    text = capsys.readouterr().out
    assert "jaccard:" in text and (tmp_path / "o.html").exists()
    # the reported overlap is the one computed from the files
    a = circuits.circuit(circuits.HeadScores.from_csv(tmp_path / "activation.csv"), top_k=3)
    b = circuits.circuit(circuits.HeadScores.from_csv(tmp_path / "attribution.csv"), top_k=3)
    assert f"shared: {len(a & b)}" in text
    assert main(["score", "--task", "circuit", "--model", path, "--quiet"]) == 2  # neither --pairs nor --generate


# ----------------------------------------------------------------------------------- organism checks
@pytest.fixture(scope="module")
def multitask():
    from headscope import zoo

    path = zoo.organism_path("multitask")
    if path is None or not (path / "config.json").exists():
        pytest.skip("multitask organism not shipped (python -m headscope.zoo.train_multitask)")
    return HeadModel.load("multitask")


IG_STEPS = 16  # EAP-IG interpolation steps for the organism checks
EFFECT = 0.1  # circuit by threshold: heads whose patching moves >= 10% of the clean-corrupt logit difference


@pytest.fixture(scope="module")
def multitask_patching(multitask):
    """Per task: activation patching, plain attribution patching and EAP-IG (``IG_STEPS``)."""
    from headscope.zoo import train_multitask as tm

    out = {}
    for task in tm.TASKS:
        groups = encode_pairs(multitask.tokenizer, tm.task_pairs(task, 32, seed=7))
        out[task] = (circuits.activation_patching(multitask, groups, progress=False),
                     circuits.attribution_patching(multitask, groups),
                     circuits.attribution_patching(multitask, groups, steps=IG_STEPS))
    return out


def _circuits(multitask_patching, size):
    """Each task's activation-patching circuit: its top-k heads, or (size "effect") every head whose
    patching moves at least ``EFFECT`` of the task's clean-corrupt logit difference."""
    if size == "effect":
        return {task: circuits.circuit(act, threshold=EFFECT) for task, (act, *_) in multitask_patching.items()}
    return {task: circuits.circuit(act, top_k=size) for task, (act, *_) in multitask_patching.items()}


@pytest.mark.parametrize("size", [
    "effect",
    pytest.param(2, marks=pytest.mark.xfail(strict=True, reason="measured Jaccard 0.33 for all three pairs")),
    pytest.param(3, marks=pytest.mark.xfail(strict=True, reason="measured Jaccard induction/kv 0.50 = induction/map")),
    pytest.param(4, marks=pytest.mark.xfail(strict=True, reason="measured Jaccard induction/kv 0.33 < induction/map 0.60")),
])
def test_organism_shared_mechanism_has_more_circuit_overlap(multitask_patching, size):
    """induction and kv lookup share a mechanism (find the earlier copy, copy what follows); the
    token map does not: their circuits overlap more. Measured with the effect threshold: induction 7
    heads, kv 6, map 1 ((0,3), 0.19: it reads the current token); Jaccard induction/kv 0.86,
    induction/map 0.14, kv/map 0.17. Top-k circuits do not show it: k forces k heads into map's
    circuit although one head carries its effect (the others move it <= 0.02), and (0,3), the
    strongest head of all three tasks, is in every one."""
    c = _circuits(multitask_patching, size)
    shared = circuits.overlap(c["induction"], c["kv"])["jaccard"]
    assert shared > circuits.overlap(c["induction"], c["map"])["jaccard"]
    assert shared > circuits.overlap(c["kv"], c["map"])["jaccard"]


@pytest.mark.parametrize("method", ["plain", "eap-ig"])
@pytest.mark.parametrize("task", ["induction", "kv", "map"])
def test_organism_attribution_agrees_with_activation_patching(multitask_patching, task, method):
    """Attribution patching (plain: one backward pass; EAP-IG, Hanna et al. 2024: 16 steps) ranks
    heads like activation patching. Measured Spearman over the 8 heads, induction / kv / map:
    plain 0.98 / 0.93 / 0.98, EAP-IG 1.00 / 0.98 / 0.83."""
    from scipy.stats import spearmanr

    act, plain, ig = multitask_patching[task]
    estimate = plain if method == "plain" else ig
    rho = spearmanr(act.scores.flatten().numpy(), estimate.scores.flatten().numpy()).statistic
    assert rho >= 0.8


def test_organism_head_detectors_find_the_induction_circuit(multitask, multitask_patching):
    """On repeated random sequences (period 10) the detectors find the textbook two-layer circuit:
    a previous-token head in layer 0 and induction heads in layer 1 only; every induction head is in
    the induction task's activation-patching circuit. Measured: previous-token (0,2) 0.75 (other
    heads <= 0.09); induction: layer 1 heads 0.36-0.38, layer 0 <= 0.005. (The previous-token head is
    not in the patching circuit: the corruption changes a token's identity, which reaches the
    induction heads' values directly, not through the previous-token head.)"""
    import random

    from headscope.analyzers.classic import head_type_scores
    from headscope.zoo import train_multitask as tm

    rng = random.Random(3)
    seqs = [rng.sample(tm.SEQ, 10) for _ in range(8)]
    tokens = torch.tensor([multitask.tokenizer(" ".join(["ind"] + s + s))["input_ids"] for s in seqs])
    previous = head_type_scores(multitask, "previous-token", tokens)
    induction = head_type_scores(multitask, "induction", tokens)
    assert previous.top(1)[0][0] == 0 and float(previous.scores.max()) > 0.5
    assert float(induction.scores[0].max()) < 0.05
    heads = set(induction.above(0.3))
    assert heads and all(layer == 1 for layer, _ in heads)
    assert heads <= _circuits(multitask_patching, "effect")["induction"]
