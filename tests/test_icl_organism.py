"""The icl organism (python -m headscope.zoo.train_icl): sixteen unseen tasks over one vocabulary that
only demonstrations tell apart, its ground truth covers every head, and (slow) its in-context learning is
real: more demonstrations help, wrong labels hurt, soft injection carries the task."""

import random

import pandas as pd
import pytest
import torch

from headscope import zoo
from headscope.methods.soft_injection import accuracy, fit_soft_selection, task_embedding
from headscope.model import HeadModel
from headscope.tasks.icl import IclTask, PromptFormat, batches


@pytest.fixture(scope="module")
def hm():
    return HeadModel.load("icl")


@pytest.fixture(scope="module")
def tasks():
    info = zoo.organism_info("icl")
    return {t: IclTask.load(zoo.organism_path("icl") / f"{t}.jsonl") for t in info["tasks"]}


def test_ground_truth_covers_every_head_and_task(hm, tasks):
    truth = pd.read_csv(zoo.ground_truth_path("icl"))
    assert len(truth) == hm.geometry.n_total
    assert {f"effect_{t}" for t in tasks} | {"layer", "head", "effect"} == set(truth.columns)
    assert truth[[f"effect_{t}" for t in tasks]].min().min() <= -0.1  # some head matters for 10-shot accuracy


def test_tasks_share_their_inputs_and_outputs_so_no_answer_is_right_for_most_tasks(tasks):
    """At least 12 tasks over the same inputs; >= 100 test queries each, disjoint from the train split
    the demonstrations come from; each task's answers lie in its recorded palette, every colour is in
    the same number of palettes, and no answer to an input is right for more than that many tasks
    (so 0-shot accuracy averaged over the tasks is at most that share: the chance level)."""
    assert len(tasks) >= 12
    info = zoo.organism_info("icl")
    palettes = dict(zip(info["tasks"], info["training"]["hyperparameters"]["evaluated_palettes"]))
    maps = {name: dict(t.pairs) for name, t in tasks.items()}
    first = next(iter(maps.values()))
    assert all(m.keys() == first.keys() for m in maps.values())
    assert all(set(m.values()) <= set(palettes[name]) for name, m in maps.items())
    uses = {c: sum(c in p for p in palettes.values()) for c in info["labels"]}
    assert len(set(uses.values())) == 1
    share = next(iter(uses.values()))
    for t in tasks.values():
        assert len(t["test"]) >= 100
        assert not {x for x, _ in t["test"]} & {x for x, _ in t["train"]}
    for x in first:
        assert max(sum(m[x] == c for m in maps.values()) for c in uses) <= share, x
    assert share / len(tasks) == pytest.approx(chance_level())


def chance_level() -> float:
    """Share of the tasks that any 0-shot answer can be right for (each colour is in the same number
    of the evaluated palettes)."""
    info = zoo.organism_info("icl")
    palettes = info["training"]["hyperparameters"]["evaluated_palettes"]
    return max(sum(c in p for p in palettes) for c in info["labels"]) / len(palettes)


def test_training_record_and_example_prompt(hm):
    """organism.json records a reproducible command (seed, one thread) and an example prompt that the
    organism answers right."""
    info = zoo.organism_info("icl")
    command = info["training"]["command"]
    assert "--seed" in command and "--threads 1" in command
    ids = hm.tokenizer(info["example"]["prompt"], return_tensors="pt").input_ids
    with torch.no_grad():
        answer = hm.model(input_ids=ids).logits[0, -1].argmax().item()
    assert hm.tokenizer.decode([answer]).strip() == info["example"]["answer"]


def _mean_accuracy(hm, tasks, k, **kwargs):
    return sum(accuracy(hm, t, k, batch_size=50, **kwargs) for t in tasks.values()) / len(tasks)


@pytest.fixture(scope="module")
def shots(hm, tasks):
    return {k: _mean_accuracy(hm, tasks, k) for k in (0, 1, 10)}


@pytest.mark.slow
def test_more_demonstrations_help(shots, tasks):
    """Every test query once, 16 tasks (1600 queries per shot count; a bootstrap interval of such a
    mean is about +-0.025): 0-shot at most chance (a 0-shot prompt is the same for every task), 1-shot
    above it, 10-shot well above 1-shot and short of the ceiling (ten demonstrations leave the
    palette partly unknown: the Bayes-optimal reader scores about 0.89)."""
    assert shots[0] <= chance_level() + 1e-9, shots
    assert shots[1] > shots[0] + 0.04, shots
    assert shots[10] > shots[1] + 0.2, shots
    assert 0.6 <= shots[10] <= 0.85, shots


@torch.no_grad()
def _wrong_label_accuracy(hm, task, k=10, seed=0):
    """k-shot accuracy when every demonstration's label is replaced by another of the organism's
    colours (not only the task's own: wrong labels from inside the palette still show the palette)."""
    rng = random.Random(seed)
    labels = zoo.organism_info("icl")["labels"]
    examples = []
    for demos, query in task.examples("test", k, seed=seed):
        examples.append(([(x, rng.choice([l for l in labels if l != y])) for x, y in demos], query))
    hits = []
    for batch in batches(hm.tokenizer, examples, PromptFormat(), 50):
        position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp_min(0)
        logits = hm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids).logits
        hits.append((logits[:, -1].argmax(-1) == batch.target).float())
    return torch.cat(hits).mean().item()


@pytest.mark.slow
def test_wrong_labels_on_the_demonstrations_hurt(hm, tasks, shots):
    """With every demonstration's label replaced by another of the colours, the demonstrations
    no longer show the task's palette: accuracy falls from 10-shot with right labels towards the
    0-shot level."""
    wrong = sum(_wrong_label_accuracy(hm, t) for t in tasks.values()) / len(tasks)
    assert wrong < shots[10] - 0.3, (wrong, shots)


@pytest.mark.slow
def test_soft_injection_carries_the_task_into_zero_shot_prompts(hm, tasks, shots):
    """Three of the tasks: the fitted injection lifts 0-shot accuracy well above the 0-shot prompt's."""
    zero, injected = [], []
    for task in list(tasks.values())[:3]:
        emb = fit_soft_selection(hm, task, task_embedding(hm, task, progress=False), progress=False)
        zero.append(accuracy(hm, task, 0))
        injected.append(accuracy(hm, task, 0, edits=emb.edit()))
    assert sum(injected) / 3 > sum(zero) / 3 + 0.2, (zero, injected)
