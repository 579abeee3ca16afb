"""The context-conflict task and organism, `headscope eval --task context-conflict` and `headscope generate`."""

import random

import pytest
import torch

from conftest import tiny_model
from headscope.cli import main
from headscope.interventions import Edit, intervene
from headscope.methods.decore import decore_generate
from headscope.model import HeadModel
from headscope.scores import HeadScores
from headscope.tasks.context_conflict import ContextConflictTask, is_faithful, make_world
from headscope.zoo import organism_path
from headscope.zoo.training import build_word_tokenizer

HAVE_ORGANISM = organism_path("context_conflict") is not None and (organism_path("context_conflict") / "config.json").exists()
needs_organism = pytest.mark.skipif(not HAVE_ORGANISM, reason="context_conflict organism not trained yet")


@pytest.fixture(scope="module")
def task():
    from headscope.zoo.train_context_conflict import build_tokenizer

    world = make_world()
    return ContextConflictTask(build_tokenizer(world), world)


def test_world_is_deterministic():
    a, b = make_world(), make_world()
    assert a == b and len(set(a.entities)) == 48 and len(set(a.values)) == 24
    assert sorted(set(a.strength.values())) == [0.1, 0.35, 0.65, 0.9]


def test_trial_spans_and_answers(task):
    rng = random.Random(0)
    tok = task.tokenizer
    for _ in range(20):
        t = task.swapped(rng.choice(task.world.entities), rng)
        statement = tok.decode(t.prompt_ids[t.needle_span[0] : t.needle_span[1]])
        assert statement == f"The capital of {t.entity} is {t.answer}."
        assert t.answer != t.memory and t.meta["swapped"]
        assert t.answer_ids == [tok.convert_tokens_to_ids(t.answer)]
        assert t.memory_ids == [tok.convert_tokens_to_ids(task.world.memory[t.entity])]
        assert tok.decode(t.prompt_ids).endswith(f"What is the capital of {t.entity}? \n Answer :")
        assert is_faithful([t.answer_ids[0], 1], t) and not is_faithful(t.memory_ids, t)
    assert task.eval_trials(10) == task.eval_trials(10)  # a fixed evaluation set


def test_training_batches_use_the_task(task):
    import argparse

    from headscope.zoo.train_context_conflict import BatchMaker

    args = argparse.Namespace(batch=16, closed_book_share=0.3, consistent_share=0.2, context_weight=0.1, answer_weight=5.0)
    ids, weights = BatchMaker(task, args, seed=0)(0)
    assert ids.shape[0] == 16 and weights.shape == ids.shape
    for row, w in zip(ids, weights):
        n = int((w > 0).sum())
        assert w[n - 1] == 5.0 and row[n - 1] == task.tokenizer.eos_token_id  # answer, then <eos>
        assert task.tokenizer.convert_ids_to_tokens(int(row[n - 2])) in task.world.values


def _last_line(capsys):
    out = capsys.readouterr().out
    assert out.endswith("\n")
    return out[:-1].split("\n")[-1]


@needs_organism
def test_eval_cli_greedy_matches_hand_count(capsys):
    assert main(["eval", "--task", "context-conflict", "--prompts", "12", "--quiet"]) == 0
    line = _last_line(capsys)
    hm = HeadModel.load("context_conflict")
    from headscope.cli.tasks.context_conflict import task_for

    items = task_for(hm).eval_trials(12)
    with torch.no_grad():
        hits = sum(int(hm.model(torch.tensor([t.prompt_ids])).logits[0, -1].argmax()) == t.answer_ids[0] for t in items)
    assert line == f"accuracy: {hits / 12:.3f}"


@needs_organism
def test_eval_cli_decore_matches_hand_contrast(capsys, tmp_path):
    hm = HeadModel.load("context_conflict")
    scores = HeadScores(torch.arange(hm.geometry.n_layers * hm.geometry.n_heads, dtype=torch.float).view(
        hm.geometry.n_layers, hm.geometry.n_heads), method="test")
    csv = scores.to_csv(tmp_path / "r.csv")
    heads = scores.top(3)
    assert main(["eval", "--task", "context-conflict", "--prompts", "8", "--quiet", "--decore", str(csv), "--top", "3"]) == 0
    line = _last_line(capsys)
    from headscope.cli.tasks.context_conflict import task_for

    hits = 0
    with torch.no_grad():
        for t in task_for(hm).eval_trials(8):
            ids = torch.tensor([t.prompt_ids])
            base = hm.model(ids).logits[0, -1]
            with intervene(hm, Edit("uniform", heads, positions=(ids.shape[1] - 1, 10**6))):
                masked = hm.model(ids).logits[0, -1]
            p = base.softmax(-1)
            a = -(p * torch.log(p + 1e-12)).sum()
            hits += int(((1 + a) * base.log_softmax(-1) - a * masked.log_softmax(-1)).argmax()) == t.answer_ids[0]
    assert line == f"accuracy: {hits / 8:.3f}"


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tok = build_word_tokenizer([" ".join(f"w{i}" for i in range(120))])  # every model id decodes
    model = tiny_model("llama", seed=2)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    scores = HeadScores(torch.tensor([[0.1, 0.9, 0.0, 0.3], [0.5, 0.05, 0.2, 0.8]]), method="retrieval")
    return str(path), str(scores.to_csv(path / "r.csv"))


@pytest.mark.parametrize("flags", [[], ["--scale", "R", "--top", "2", "--alpha", "-1"], ["--ablate", "R", "--top", "2"],
                                   ["--decore", "R", "--top", "2"], ["--ablate", "R", "--top", "2", "--scope", "decode"]])
def test_generate_cli(saved_tiny, capsys, flags):
    path, csv = saved_tiny
    flags = [csv if f == "R" else f for f in flags]
    prompt = "w1 w2 w3 w4 w5"
    assert main(["generate", "--model", path, "--prompt", prompt, "--max-new-tokens", "4"] + flags) == 0
    line = _last_line(capsys)
    hm = HeadModel.load(path)
    ids = torch.tensor([hm.tokenizer(prompt)["input_ids"]])
    heads = [(0, 1), (1, 3)]
    with torch.no_grad():
        if "--decore" in flags:
            out = decore_generate(hm, ids, heads, max_new_tokens=4, eos_token_id=hm.tokenizer.eos_token_id).sequences
        else:
            edits = []
            if "--scale" in flags:
                edits = [Edit("scale", heads, strength=-1.0)]
            elif "--ablate" in flags:
                edits = [Edit("zero", heads, scope="decode" if "decode" in flags else "both")]
            with intervene(hm, edits):
                out = hm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                                        pad_token_id=hm.tokenizer.pad_token_id)
    assert line == hm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_cli_errors(saved_tiny, capsys):
    path, csv = saved_tiny
    assert main(["generate", "--model", path, "--prompt", "w1", "--scale", csv]) == 2
    assert "--top" in capsys.readouterr().err
    assert main(["generate", "--model", path, "--prompt", "w1", "--scale", csv, "--decore", csv, "--top", "1"]) == 2
    assert "only one" in capsys.readouterr().err
    assert main(["eval", "--task", "needle", "--model", path, "--decore", csv, "--top", "1", "--lengths", "64"]) == 2
    assert "DeCoRe" in capsys.readouterr().err


@pytest.mark.slow
@needs_organism
def test_decore_with_retrieval_heads_beats_greedy_and_random_heads_do_not():
    """Acceptance (issue 4): on swapped contexts, DeCoRe masking the top-K retrieval heads is >= 10
    points more context-faithful than greedy; DeCoRe with K random heads (5 draws) is not."""
    import argparse

    from headscope.analyzers.retrieval import retrieval_heads
    from headscope.cli.tasks.context_conflict import SCORE_SEED, first_tokens, task_for
    from headscope.methods.decore import random_heads

    K = 4
    hm = HeadModel.load("context_conflict")
    task = task_for(hm)
    scores = retrieval_heads(hm, task.eval_trials(192, seed=SCORE_SEED), progress=False)
    top = scores.top(K)
    items = task.eval_trials(192)

    def accuracy(heads=None):
        answers = first_tokens(hm, items, 16, heads)
        return sum(a == t.answer_ids[0] for a, t in zip(answers, items)) / len(items)

    greedy = accuracy()
    decore = accuracy(top)
    randoms = [accuracy(random_heads(hm, K, exclude=top, seed=s)) for s in range(5)]
    print(f"greedy {greedy:.3f} decore {decore:.3f} random {randoms}")
    assert decore - greedy >= 0.10
    assert sum(randoms) / len(randoms) - greedy < 0.05
