"""Hallucination evaluation: CHAIR and POPE on hand-computed examples; the vision organism and its task."""

import random
import re

import pytest

from headscope import zoo
from headscope.errors import HeadscopeError
from headscope.tasks import hallucination as hal
from headscope.tasks import shapes

VOCAB = ["cat", "dog", "car", "fork", "knife"]
HAVE_ORGANISM = (zoo.organism_path("vision") / "model.safetensors").exists()
needs_organism = pytest.mark.skipif(not HAVE_ORGANISM, reason="vision organism not shipped "
                                    "(python -m headscope.zoo.train_vision)")


def test_chair_by_hand():
    captions = [
        "A cat and a dog.",             # truth {cat}: dog hallucinated        -> 2 mentions, 1 wrong
        "a fork, a fork and a knife",   # truth {fork, knife}: counted once     -> 2 mentions, 0 wrong
        "nothing to see",               # truth {car}: no mention               -> 0 mentions
        "A Car next to a CAT",          # truth {car}: cat hallucinated (case) -> 2 mentions, 1 wrong
    ]
    truths = [{"cat"}, {"fork", "knife"}, {"car"}, {"car"}]
    m = hal.chair(captions, truths, VOCAB)
    assert m["chair_i"] == pytest.approx(2 / 6)
    assert m["chair_s"] == pytest.approx(2 / 4)
    assert m["recall"] == pytest.approx(4 / 5)  # cat, fork, knife, car found; car of caption 3 missed
    assert hal.mentioned_objects("cats and carpets", VOCAB) == set()  # whole words only
    assert hal.chair([], [], VOCAB) == {"chair_i": 0.0, "chair_s": 0.0, "recall": 0.0}
    with pytest.raises(HeadscopeError, match="one set of true objects per caption"):
        hal.chair(["a cat"], [], VOCAB)


def test_pope_metrics_by_hand():
    answers = [True, True, False, True, False, False]
    labels = [True, False, True, True, False, False]
    # tp 2, fp 1, fn 1, tn 2
    m = hal.pope_metrics(answers, labels)
    assert m["acc"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["yes_share"] == pytest.approx(3 / 6)
    always_no = hal.pope_metrics([False] * 4, [True, False, True, False])
    assert always_no["f1"] == 0.0 and always_no["precision"] == 0.0 and always_no["acc"] == 0.5
    with pytest.raises(HeadscopeError, match="as many answers as labels"):
        hal.pope_metrics([True], [True, False])


def test_pope_parsing_follows_the_paper():
    assert hal.says_yes("Yes, there is.") and hal.says_yes("yes")
    assert not hal.says_yes("No.") and not hal.says_yes("There is not a dog") and not hal.says_yes("no")


def test_pope_negatives_per_setting():
    truths = [{"fork", "cat"}]
    frequency = {"cat": 0.5, "dog": 0.4, "car": 0.1, "fork": 0.3, "knife": 0.2}
    together = {("fork", "knife"): 0.3, ("cat", "dog"): 0.1, ("fork", "car"): 0.05, ("cat", "car"): 0.01}
    popular = hal.pope_questions(truths, VOCAB, "popular", frequency=frequency)
    assert popular == [(0, "cat", True), (0, "fork", True), (0, "dog", False), (0, "knife", False)]
    adversarial = hal.pope_questions(truths, VOCAB, "adversarial", cooccurrence=together)
    assert [o for _, o, y in adversarial if not y] == ["knife", "dog"]  # 0.3, 0.1; car has 0.06
    rnd = hal.pope_questions(truths, VOCAB, "random", seed=3)
    negatives = [o for _, o, y in rnd if not y]
    assert len(negatives) == 2 and not set(negatives) & truths[0]
    assert rnd == hal.pope_questions(truths, VOCAB, "random", seed=3)  # deterministic
    # fewer absent objects than present ones: as many negatives as there are
    assert len(hal.pope_questions([{"cat", "dog", "car", "fork"}], VOCAB, "random")) == 5
    with pytest.raises(HeadscopeError, match="unknown POPE setting"):
        hal.pope_questions(truths, VOCAB, "hard")
    with pytest.raises(HeadscopeError, match="co-occurrence"):
        hal.pope_questions(truths, VOCAB, "adversarial")


def test_scenes_carry_the_cooccurrence_prior():
    a = shapes.heldout_scenes(50, seed=7)
    assert a == shapes.heldout_scenes(50, seed=7)
    assert all(any(k in s.kinds and shapes.PAIRS[k] not in s.kinds for k in shapes.PAIRS) for s in a)
    rng = random.Random(0)
    scenes = [shapes.sample_scene(rng) for _ in range(4000)]
    with_anchor = [s for s in scenes if "circle" in s.kinds]
    share = sum("square" in s.kinds for s in with_anchor) / len(with_anchor)
    assert 0.95 < share < 1.0  # partner present ~98.5% of the time (absent 3% of pairs, half anchor-only)
    frequency, together = shapes.training_statistics(n=4000)
    assert together["circle", "square"] > 0.9 * frequency["circle"]
    assert together["circle", "square"] > 3 * together["circle", "cross"]
    s = shapes.Scene((shapes.Obj("square", "blue", 5), shapes.Obj("circle", "red", 0)), 0)
    assert s.caption() == "a red circle and a blue square ."
    pixels = s.image(noise=0)
    assert pixels.size == (32, 32) and pixels.getpixel((8 + 4, 8 + 4)) == shapes.COLOURS["blue"]
    assert pixels.getpixel((31, 31)) == (30, 30, 30)


@needs_organism
def test_organism_loads_like_a_hub_model():
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from headscope.zoo.train_vision import IMAGE_TOKEN, N_IMAGE_TOKENS, encode

    folder = zoo.organism_path("vision")
    model = LlavaForConditionalGeneration.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    assert sum(p.numel() for p in model.parameters()) * 4 < 4e6  # a few MB
    scene = shapes.heldout_scenes(1, seed=0, partner_absent=False)[0]
    batch = processor(images=[scene.image()], text=[shapes.CAPTION_PROMPT], return_tensors="pt")
    ids, _ = encode(processor, shapes.CAPTION_PROMPT, "")  # training ids = the processor's expansion (+ eos)
    assert batch["input_ids"][0].tolist() == ids[:-1]
    assert (batch["input_ids"] == model.config.image_token_id).sum() == N_IMAGE_TOKENS
    assert processor.tokenizer.convert_ids_to_tokens(model.config.image_token_id) == IMAGE_TOKEN
    # any image size works (resized to 32 x 32); the scenes' own 32 x 32 pixels pass unchanged
    raw = torch.tensor(np.asarray(scene.image()), dtype=torch.float32).permute(2, 0, 1) / 255
    torch.testing.assert_close(batch["pixel_values"][0], (raw - 0.5) / 0.5)
    big = processor(images=[Image.new("RGB", (224, 100))], text=[shapes.CAPTION_PROMPT], return_tensors="pt")
    assert big["pixel_values"].shape[-2:] == (32, 32) and torch.equal(big["input_ids"], batch["input_ids"])
    out = model.generate(**batch, max_new_tokens=24, do_sample=False)
    caption = processor.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    # a complete scene: the caption names exactly its objects, in the training captions' grammar
    assert hal.mentioned_objects(caption, shapes.KINDS) == scene.kinds
    assert re.fullmatch(r"a \w+ \w+( and a \w+ \w+)* ?\.", caption.strip()), caption


@needs_organism
def test_eval_task_prints_the_four_measures_last(capsys):
    from headscope.cli import main

    assert main(["eval", "--task", "hallucination", "--scenes", "12", "--quiet"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines[-4:]] == ["chair_i", "chair_s", "pope_acc", "pope_f1"]
    values = {line.split(":")[0]: float(line.split(":")[1]) for line in lines}
    assert all(0.0 <= v <= 1.0 for v in values.values())
    assert values["caption_recall"] > 0.6  # it sees the objects (0.85 on the 100 default scenes)
    assert values["pope_adversarial_yes_share"] >= values["pope_random_yes_share"]  # the prior says yes


@needs_organism
@pytest.mark.parametrize("args, message", [
    (["--scenes", "0"], "--scenes: must be >= 1"),
    (["--caption-prompt", "describe :"], "no <image> placeholder"),
    (["--question-prompt", "<image> is there ?"], "no {object} slot"),
    (["--model", "retrieval"], "needs a vision-language model"),
])
def test_eval_task_bad_input(capsys, args, message):
    from headscope.cli import main

    assert main(["eval", "--task", "hallucination", "--quiet"] + args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


@needs_organism
@pytest.mark.slow
def test_organism_hallucinates_absent_partners():
    """Acceptance: base CHAIR_i >= 0.15 on the held-out partner-absent scenes; POPE's adversarial
    setting is the hardest (lowest accuracy, most "yes"), as in Li et al. 2023."""
    from headscope.model import HeadModel

    hm = HeadModel.load("vision")
    m = shapes.scene_metrics(hm, shapes.heldout_scenes(100, seed=zoo.organism_info("vision")["heldout"]["seed"]))
    assert m["chair_i"] >= 0.15
    assert m["pope_adversarial_acc"] < m["pope_random_acc"]
    assert m["pope_adversarial_yes_share"] > m["pope_random_yes_share"]


def test_training_is_seeded_and_reproducible():
    import torch

    from headscope.zoo import train_vision as tv
    from headscope.zoo.training import seed_everything, train_loop

    def run():
        seed_everything(0, threads=1)
        processor = tv.build_processor()
        model = tv.build_model(processor, hidden=32, layers=1, heads=4, kv_heads=2, vision_hidden=32, vision_layers=1)
        stats = train_loop(model, tv.make_batch_fn(processor, 4, seed=0, absent=0.03), steps=3, log_every=0)
        return stats["losses"], model.lm_head.weight.detach().clone()

    (losses_a, w_a), (losses_b, w_b) = run(), run()
    torch.set_num_threads(2)
    assert losses_a == losses_b and torch.equal(w_a, w_b)
    assert losses_a[0] > 0


@needs_organism
def test_head_pursuit_finds_the_organisms_shape_heads():
    """Head pursuit over image tokens (Basile et al. 2025) with the organism's shape words as the
    concept: suppressing its top 2 heads (z x -1) in captioning breaks naming the first object's
    shape far more than random heads with the same count per layer, and leaves colour naming alone.
    Measured (benchmarks/vision_pursuit.py, 200 scenes, 20 draws): shape accuracy 0.990 -> 0.655
    against 0.874 [0.824, 0.915] (mean, 95 % bootstrap interval) for random heads; colour 0.480 ->
    0.390 against 0.402 [0.386, 0.420]."""
    import statistics

    from headscope import HeadModel
    from headscope.analyzers.pursuit import concept_token_ids, scale_heads
    from headscope.analyzers.vision import image_head_pursuit
    from headscope.heads import same_layer_random_heads

    hm = HeadModel.load("vision")
    g = hm.geometry
    fit = shapes.heldout_scenes(64, seed=7, partner_absent=False)
    test = shapes.heldout_scenes(200, seed=8, partner_absent=False)
    ids = concept_token_ids(hm.processor.tokenizer, shapes.KINDS, with_space=False)
    scores = image_head_pursuit(hm, [s.image() for s in fit], [shapes.CAPTION_PROMPT] * len(fit), ids, k=len(ids))
    heads = scores.top(2)

    def accuracy(chosen, attribute):
        with hm.edit_z(scale_heads(chosen, -1.0, g.n_layers, g.n_heads)):
            return shapes.first_object_accuracy(hm, test, attribute)["accuracy"]

    base = accuracy([], "kind")
    edited = accuracy(heads, "kind")
    rng = random.Random(0)
    control = [accuracy(same_layer_random_heads(heads, g.n_heads, rng), "kind") for _ in range(5)]
    assert base > 0.95
    assert edited < min(control) - 0.05 and edited < base - 0.2
    assert accuracy(heads, "colour") > accuracy([], "colour") - 0.15  # the colour naming is spared
    assert statistics.mean(control) > edited + 0.1
    assert not hm.hooks_installed()


def test_first_object_accuracy_rejects_an_unknown_attribute():
    with pytest.raises(HeadscopeError, match="'colour' or 'kind'"):
        shapes.first_object_accuracy(None, [], "size")


@pytest.mark.parametrize("template", ["Is there a {thing} in <image>?", "Is there a {} in <image>?",
                                      "Is there a {object!z} in <image>?"])
def test_pope_refuses_a_template_with_another_field_before_generating(template):
    """From Python as from the CLI: a field other than {object} is one HeadscopeError, raised before
    the model is used (hm=None here would fail on first use)."""
    with pytest.raises(HeadscopeError, match="the only field allowed is"):
        hal.pope(None, [], [(0, "circle", True)], template)
