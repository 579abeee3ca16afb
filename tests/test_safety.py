"""Ships, dataset-level Ships and Sahara against hand computations; prompt loaders."""

import contextlib
import json

import numpy as np
import pytest
import scipy.linalg
import torch
from conftest import tiny_model

from headscope.analyzers import safety
from headscope.errors import HeadscopeError
from headscope.model import HeadModel
from headscope.tasks.safety_prompts import REFERENCE_TEMPLATE, encode_prompts, format_prompt, load_prompts

PROMPT = [1, 17, 5, 99, 42, 8, 23, 64, 3, 11]
PROMPTS = [[1, 17, 5, 99, 42, 8], [1, 4, 9, 16, 25, 36], [1, 2, 3, 5, 7, 11, 13], [1, 90, 80, 70, 60, 50, 40]]


def _hand_probs(model, ids, hook_module=None, hook=None, pre=False):
    handle = None
    if hook_module is not None:
        handle = hook_module.register_forward_pre_hook(hook) if pre else hook_module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].double()
    finally:
        if handle is not None:
            handle.remove()
    return torch.softmax(logits, -1).numpy()


def _sharp(kind):
    """A float64 tiny model with sharpened attention, so one head's ablation moves the output clearly."""
    model = tiny_model(kind).double()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", "c_attn.weight")):
                param.mul_(4.0)
    return model


def _hand_kl(p, q):
    return float(np.sum(p * (np.log(p + 1e-12) - np.log(q + 1e-12))))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("eps", [1e-4, 1e-5])
def test_ships_equals_hand_kl_with_query_scaled_by_a_hook(kind, eps):
    model = _sharp(kind)
    hm = HeadModel(model)
    layer, head, d = 1, 2, 16

    def scale_q(module, args, out):  # scale head 2's query slice by eps (before RoPE: RoPE is linear)
        out = out.clone()
        out[..., head * d : (head + 1) * d] *= eps  # GPT-2's fused c_attn starts with q
        return out

    proj = model.model.layers[layer].self_attn.q_proj if kind == "llama" else model.transformer.h[layer].attn.c_attn
    p = _hand_probs(model, PROMPT)
    q = _hand_probs(model, PROMPT, proj, scale_q)
    kl = safety.ships_per_query(hm, PROMPT, eps=eps, batch_size=3)
    assert kl[layer, head].item() == pytest.approx(_hand_kl(p, q), rel=1e-6, abs=1e-12)
    assert _hand_kl(p, q) > 1e-6  # the ablation changed something
    assert not hm.hooks_installed()


def test_ships_output_scaling_equals_hand_kl():
    model = _sharp("llama")
    hm = HeadModel(model)

    def scale_z(module, args):
        z = args[0].clone()
        z[..., 1 * 16 : 2 * 16] *= 1e-4  # head 1 of layer 0
        return (z,)

    p = _hand_probs(model, PROMPT)
    q = _hand_probs(model, PROMPT, model.model.layers[0].self_attn.o_proj, scale_z, pre=True)
    kl = safety.ships_per_query(hm, PROMPT, ablation="output")
    assert kl[0, 1].item() == pytest.approx(_hand_kl(p, q), rel=1e-6, abs=1e-12)


def test_batched_copies_equal_one_head_at_a_time():
    hm = HeadModel(tiny_model("qwen2"))
    batched = safety.ships_per_query(hm, PROMPT, batch_size=8)
    single = safety.ships_per_query(hm, PROMPT, batch_size=1)
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-9)
    assert torch.isfinite(batched).all() and (batched >= 0).all()


def test_dataset_ranking_counts_top_k_and_breaks_ties_by_summed_kl():
    kl = torch.tensor(
        [[[5.0, 4.0, 0.1, 0.0]],
         [[0.2, 3.0, 2.0, 0.0]],
         [[0.0, 0.1, 0.3, 0.2]]]
    )  # 3 queries, 1 layer, 4 heads; top-2 per query: {0,1}, {1,2}, {2,3}
    score, count, total = safety.rank_by_query_counts(kl, top_per_query=2)
    assert count[0].tolist() == [1, 2, 2, 1]
    torch.testing.assert_close(total[0], torch.tensor([5.2, 7.1, 2.4, 0.2], dtype=torch.float64))
    order = torch.argsort(score[0], descending=True).tolist()
    assert order == [1, 2, 0, 3]  # head 1 and 2 tie on count; head 1 has the larger summed KL


def test_ships_ranking_over_prompts_and_per_query_attribute():
    hm = HeadModel(_sharp("llama"))
    result = safety.ships(hm, PROMPTS[:2], top_per_query=3, progress=False)
    assert result.per_query.shape == (2, 2, 4)
    for i, row in enumerate(result.per_query):
        torch.testing.assert_close(row, safety.ships_per_query(hm, PROMPTS[i], batch_size=1))
    assert result.count.sum().item() == 6
    assert result.top(1)[0] in hm.all_heads()


@pytest.mark.parametrize("shape", [(20, 1, 1), (20, 3, 2), (7, 4, 4), (50, 5, 3)])
def test_principal_angles_equal_scipy(shape):
    n, ka, kb = shape
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(n, ka)), rng.normal(size=(n, kb))
    np.testing.assert_allclose(safety.principal_angles(a, b), scipy.linalg.subspace_angles(a, b), atol=1e-7)
    near = a[:, :kb] + 1e-7 * rng.normal(size=(n, kb))  # tiny angles: arccos alone would lose them
    np.testing.assert_allclose(safety.principal_angles(a[:, :kb], near), scipy.linalg.subspace_angles(a[:, :kb], near),
                               rtol=1e-6, atol=1e-15)


@pytest.mark.parametrize("r", [1, 3])
def test_subspace_shift_equals_scipy_on_left_singular_vectors(r):
    rng = np.random.default_rng(1)
    base = rng.normal(size=(12, 8))
    ablated = base + 0.3 * rng.normal(size=(12, 8))
    u_b = np.linalg.svd(base, full_matrices=False)[0][:, :r]
    u_a = np.linalg.svd(ablated, full_matrices=False)[0][:, :r]
    expected = np.degrees(scipy.linalg.subspace_angles(u_b, u_a)).sum()
    assert safety.subspace_shift(base, ablated, r) == pytest.approx(expected, rel=1e-9)
    assert safety.subspace_shift(base, base, r) == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(HeadscopeError, match="r must lie"):
        safety.subspace_shift(base, ablated, 9)


def test_last_hidden_states_batched_rows_equal_separate_ablations():
    model = tiny_model("llama")
    hm = HeadModel(model)
    sets = [(), [(0, 1)], [(1, 3), (0, 0)]]
    mats = safety.last_hidden_states(hm, PROMPTS, sets, batch_size=5)
    for s, heads in enumerate(sets):
        for q, ids in enumerate(PROMPTS):
            with contextlib.ExitStack() as stack, torch.no_grad():
                for layer, head in heads:  # one scale_queries block per ablated head, batch of one
                    scale = torch.ones(4)
                    scale[head] = 1e-4
                    stack.enter_context(hm.scale_queries(layer, scale))
                ref = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, -1]
            torch.testing.assert_close(mats[s, q].float(), ref, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(mats[0], mats[1])


def test_sahara_first_pick_is_the_best_single_head_and_resumes(tmp_path):
    hm = HeadModel(tiny_model("llama"))
    single = safety.generalized_ships(hm, PROMPTS, progress=False)
    fresh = safety.sahara(hm, PROMPTS, max_heads=2, progress=False)
    assert tuple(fresh.params["chosen"][0]) == single.top(1)[0]
    assert fresh.params["step_scores"][0] == pytest.approx(single.scores.max().item(), rel=1e-4)
    assert fresh.top(2) == [tuple(h) for h in fresh.params["chosen"]]

    state = tmp_path / "sahara.json"
    first = safety.sahara(hm, PROMPTS, max_heads=1, state=state, progress=False)
    saved = json.loads(state.read_text())
    assert saved["chosen"] == first.params["chosen"] and len(saved["scores"]) == 1
    resumed = safety.sahara(hm, PROMPTS, max_heads=2, state=state, progress=False)
    assert resumed.params["chosen"] == fresh.params["chosen"]
    assert resumed.params["step_scores"] == fresh.params["step_scores"]
    with pytest.raises(HeadscopeError, match="other settings"):
        safety.sahara(hm, PROMPTS, max_heads=2, eps=1e-5, state=state, progress=False)


def test_sahara_stops_at_a_score():
    hm = HeadModel(tiny_model("llama"))
    result = safety.sahara(hm, PROMPTS, max_heads=8, min_score=0.0, progress=False)
    assert len(result.params["chosen"]) == 1


def test_ships_on_named_heads_scores_only_them():
    hm = HeadModel(_sharp("llama"))
    full = safety.ships(hm, PROMPTS[:2], top_per_query=3, progress=False)
    part = safety.ships(hm, PROMPTS[:2], top_per_query=3, heads="L0H1, L1H2", progress=False)
    scored = (~torch.isnan(part.scores)).nonzero().tolist()
    assert scored == [[0, 1], [1, 2]]
    torch.testing.assert_close(part.per_query[:, 0, 1], full.per_query[:, 0, 1])
    torch.testing.assert_close(part.per_query[:, 1, 2], full.per_query[:, 1, 2])
    assert part.count[0, 1] == part.count[1, 2] == 2  # both heads in each query's top 3 of the 2 scored


def test_cli_safety_heads_by_name_and_max_heads(tmp_path):
    """``score --task safety --heads NAMES`` names Sahara's candidates (the heads-by-name parser);
    the stop count is ``--max-heads`` (the old ``--heads N``, which now says so)."""
    import types

    import pandas as pd

    from headscope.cli import main
    from headscope.cli.tasks.safety import queries

    out = tmp_path / "s.csv"
    argv = ["score", "--task", "safety", "--quiet", "--method", "sahara", "--heads", "L1H5,L0H2", "--max-heads", "1",
            "--limit", "2", "--out", str(out)]
    assert main(argv) == 0
    frame = pd.read_csv(out).dropna()
    qs = queries(types.SimpleNamespace(prompts=None, model="refusal", limit=2))
    ref = safety.sahara(HeadModel.load("refusal"), qs, max_heads=1, candidates=[(1, 5), (0, 2)], progress=False)
    assert sorted(zip(frame["layer"], frame["head"])) == [(0, 2), (1, 5)]
    for layer, head, score in zip(frame["layer"], frame["head"], frame["score"]):
        assert score == pytest.approx(float(ref.scores[layer, head]), rel=1e-5)
    assert len(ref.params["chosen"]) == 1
    assert main(argv[:6] + ["--heads", "3"]) == 2


def test_bad_inputs_raise_and_leave_no_hooks():
    hm = HeadModel(tiny_model("llama"))
    with pytest.raises(HeadscopeError, match="invalid head"):
        safety.ships_per_query(hm, PROMPT, heads=[(5, 0)])
    with pytest.raises(HeadscopeError, match="unknown Ships ablation"):
        safety.ships_per_query(hm, PROMPT, ablation="mean")
    with pytest.raises(HeadscopeError, match="no prompts"):
        safety.ships(hm, [], progress=False)
    with pytest.raises(RuntimeError):
        with safety.ablate_rows(hm, [[(0, 0)]]):
            raise RuntimeError("boom")
    assert not hm.hooks_installed()


# ------------------------------------------------------------------------------ prompts
def test_prompt_loaders(tmp_path):
    (tmp_path / "adv.csv").write_text('goal,target\n"Explain glorp crystals, briefly",Sure\nSecond,Sure\n')
    (tmp_path / "jbb.jsonl").write_text('{"Goal": "one", "Behavior": "x"}\n\n{"Goal": "two", "Behavior": "y"}\n')
    (tmp_path / "mi.txt").write_text("first query\n\n  second query  \n")
    assert load_prompts(tmp_path / "adv.csv") == ["Explain glorp crystals, briefly", "Second"]
    assert load_prompts(tmp_path / "adv.csv", column="target", limit=1) == ["Sure"]
    assert load_prompts(tmp_path / "jbb.jsonl", column="Goal") == ["one", "two"]
    assert load_prompts(tmp_path / "mi.txt") == ["first query", "second query"]
    with pytest.raises(HeadscopeError, match="no column 'goal'"):
        load_prompts(tmp_path / "jbb.jsonl", column="goal")
    with pytest.raises(HeadscopeError, match="does not exist"):
        load_prompts(tmp_path / "missing.csv")


def test_templates():
    assert format_prompt("hi") == "## Query: hi\n## Answer:" == REFERENCE_TEMPLATE.format(q="hi")
    assert format_prompt("hi", template="Q: {q} A:") == "Q: hi A:"
    with pytest.raises(HeadscopeError, match="chat template"):
        format_prompt("hi", tokenizer=None, template="chat")
    with pytest.raises(HeadscopeError, match="containing"):
        format_prompt("hi", template="no field")


def test_chat_template_encoding():
    from headscope.zoo.training import build_word_tokenizer

    tok = build_word_tokenizer(["## Query: hi\n## Answer: user assistant"])
    tok.chat_template = "{% for m in messages %}user: {{ m['content'] }}\n{% endfor %}assistant:"
    ids = encode_prompts(tok, ["hi"], template="chat")[0]
    assert tok.convert_ids_to_tokens(ids) == ["user", ":", "hi", "\n", "assistant", ":"]
    ref = encode_prompts(tok, ["hi"])[0]
    assert tok.convert_ids_to_tokens(ref)[:5] == ["<bos>", "#", "#", "Query", ":"]
