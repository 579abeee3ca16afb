"""Vision-language models: loading with the processor, image positions, VHD against a hand
computation with plain transformers, VHR as an edit."""

import numpy as np
import pytest
import torch

from headscope import HeadModel, vision
from headscope.analyzers.vision import (head_divergence, outlier_filter, select_heads, token_vhd,
                                        vision_aware_heads)
from headscope.errors import HeadscopeError

PROMPTS = ["USER: <image> describe ASSISTANT:", "USER: <image> is there a red square ? ASSISTANT:",
           "<image> what do you see ?"]


def images(n, size=40):
    from PIL import Image

    return [Image.fromarray((np.random.RandomState(i).rand(size, size, 3) * 255).astype("uint8")) for i in range(n)]


@pytest.fixture(scope="module")
def llava_path(tmp_path_factory):
    from headscope.zoo.random_vlm import random_llava

    path = random_llava(tmp_path_factory.mktemp("llava"), layers=3, heads=8, kv_heads=4)
    # larger value weights make the per-layer VHD spread exceed 1, so the outlier filter runs; in
    # layer 1, heads 0 and 1 (kv head 0) get much larger outputs: outliers in VHD and ||z_txt||
    import transformers as tf

    model = tf.LlavaForConditionalGeneration.from_pretrained(path)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.v_proj.weight.mul_(40)
        model.model.language_model.layers[1].self_attn.v_proj.weight[:8].mul_(5)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hm(llava_path):
    return HeadModel.load(llava_path)


def test_load_gives_processor_and_image_groups(hm):
    assert hm.processor is not None and hm.tokenizer is not None
    assert "Pil" in type(hm.processor.image_processor).__name__
    batch = vision.encode(hm, images(2), PROMPTS[:2])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    groups = vision.token_groups(hm, ids, mask)
    assert groups["image"].sum(1).tolist() == [16, 16]  # (32 / 8)^2 patches per image
    for b in range(2):  # left padding: the image sits at a different place in each row
        pos = groups["image"][b].nonzero().flatten()
        after = groups["text_after_image"][b].nonzero().flatten()
        assert int(after.min()) == int(pos.max()) + 1 and int(after.max()) == ids.shape[1] - 1
        assert not (groups["text_before_image"][b] & ~mask[b].bool()).any()
    assert groups["image"][0].nonzero()[0] != groups["image"][1].nonzero()[0]
    kg = vision.key_groups(hm, ids, mask)
    assert torch.equal(kg == 0, groups["image"]) and torch.equal(kg == 1, groups["text_after_image"])


def _hand_vhd(path, image, prompt):
    """VHD with plain transformers: two forwards, z from a pre-hook on every o_proj."""
    import transformers as tf

    model = tf.LlavaForConditionalGeneration.from_pretrained(path).eval()
    processor = tf.AutoProcessor.from_pretrained(path)
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    layers = model.model.language_model.layers
    n_heads, d = model.config.text_config.num_attention_heads, model.config.text_config.head_dim
    captured = {}
    handles = [layer.self_attn.o_proj.register_forward_pre_hook(
        lambda mod, args, i=i: captured.__setitem__(i, args[0][0, -1].view(n_heads, d).clone()))
        for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            model(**inputs)
            z_img = torch.stack([captured[i] for i in range(len(layers))])
            ids = inputs["input_ids"][0]
            model(input_ids=ids[ids != model.config.image_token_id][None])
            z_txt = torch.stack([captured[i] for i in range(len(layers))])
    finally:
        for h in handles:
            h.remove()
    vhd = (z_img - z_txt).norm(dim=-1)
    txt = z_txt.pow(2).sum(-1)
    filtered = vhd.clone()
    for layer in range(vhd.shape[0]):
        v, t = vhd[layer], txt[layer]
        if v.std() > 1:
            filtered[layer][(v > v.mean() + v.std()) & (t > t.mean() + t.std())] = 0
    return vhd, filtered


def test_vhd_equals_hand_computation(hm, llava_path):
    imgs = images(3)
    hand = [_hand_vhd(llava_path, i, p) for i, p in zip(imgs, PROMPTS)]
    raw = torch.stack([h[0] for h in hand])
    assert (raw.std(-1) > 1).any(), "the fixture must exercise the outlier filter"
    assert any((h[0] != h[1]).any() for h in hand), "some head must be filtered out"
    # batch 2 (left-padded) then 1: batching must not change a sample's VHD
    scores = vision_aware_heads(hm, imgs, PROMPTS, batch_size=2)
    expected = torch.stack([h[1] for h in hand]).mean(0)
    torch.testing.assert_close(scores.scores, expected, atol=1e-5, rtol=1e-5)
    unfiltered = vision_aware_heads(hm, imgs, PROMPTS, batch_size=3, filter_outliers=False)
    torch.testing.assert_close(unfiltered.scores, raw.mean(0), atol=1e-5, rtol=1e-5)
    assert not hm.hooks_installed()


def test_outlier_filter_and_selection():
    vhd = torch.tensor([[0.1, 0.2, 0.3, 0.4], [1.0, 1.0, 1.0, 9.0], [1.0, 1.0, 1.0, 9.0]])
    txt = torch.tensor([[9.0, 0, 0, 0], [0.0, 0, 0, 9], [0.0, 0, 0, 0]])
    out = outlier_filter(vhd, txt)
    assert out[0].tolist() == vhd[0].tolist()  # std <= 1: untouched
    assert out[1].tolist() == [1.0, 1.0, 1.0, 0.0]  # outlier in both VHD and ||z_txt||^2
    assert out[2].tolist() == vhd[2].tolist()  # large VHD alone is kept
    from headscope.scores import HeadScores

    scores = HeadScores(torch.tensor([[4.0, 1, 2, 3], [1.0, 2, 3, 4]]), method="vhd", params={"layers": [1]})
    assert select_heads(scores) == [(1, 2), (1, 3)]  # strictly above the median, chosen layers only
    assert select_heads(scores, layers=[0, 1]) == [(0, 0), (0, 3), (1, 2), (1, 3)]


def test_token_vhd_frame(hm):
    frame = token_vhd(hm, images(1)[0], PROMPTS[0], max_new_tokens=3, top_k=4)
    assert list(frame.columns) == ["step", "token_id", "token", "t_vhd"] and len(frame) == 3
    # step 0 is the last prompt token: the same row VHD scores
    batch = vision.encode(hm, images(1), PROMPTS[:1])
    vhd, _ = head_divergence(hm, batch)
    assert frame["t_vhd"][0] == pytest.approx(float(vhd.flatten().topk(4).values.sum()), rel=1e-5)


def test_bad_vision_inputs(hm, tmp_path):
    with pytest.raises(HeadscopeError, match="image placeholder '<image>'"):
        vision.encode(hm, images(1), ["describe the picture"])
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(HeadscopeError, match="cannot read image .*broken.png"):
        vision.load_image(bad)
    from conftest import tiny_model

    text_only = HeadModel(tiny_model("llama"))
    with pytest.raises(HeadscopeError, match="needs a vision-language model"):
        vision_aware_heads(text_only, images(1), PROMPTS[:1])


def test_vhr_edit_in_batched_generate_matches_single_prompts(hm):
    from headscope.interventions import Edit, intervene

    scores = vision_aware_heads(hm, images(2), PROMPTS[:2])
    heads = select_heads(scores)
    assert heads and all(layer in scores.params["layers"] for layer, _ in heads)
    vhr = Edit("scale", heads, strength=2.0)
    kwargs = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True,
                  pad_token_id=vision.pad_id(hm))
    batch = vision.encode(hm, images(2), PROMPTS[:2])
    with torch.no_grad():
        base = torch.stack(hm.model.generate(**batch, **kwargs).logits)
        with intervene(hm, vhr):
            both = torch.stack(hm.model.generate(**batch, **kwargs).logits)
            single = torch.stack(hm.model.generate(**vision.encode(hm, images(2)[1:], PROMPTS[1:2]), **kwargs).logits)
    assert (both - base).abs().max() > 1e-3
    torch.testing.assert_close(both[:, 1], single[:, 0], atol=1e-4, rtol=1e-4)


def test_cli_vhd_score_generate_and_errors(llava_path, tmp_path, capsys):
    from headscope.cli import main

    folder = tmp_path / "images"
    folder.mkdir()
    for i, img in enumerate(images(2)):
        img.save(folder / f"{i}.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS[0] + "\n")
    out = tmp_path / "vhd.csv"
    assert main(["score", "--task", "vhd", "--model", str(llava_path), "--images", str(folder), "--prompts",
                 str(prompts), "--out", str(out), "--quiet"]) == 0
    assert out.exists()
    gen = ["generate", "--model", str(llava_path), "--image", str(folder / "0.png"), "--max-new-tokens", "2"]
    assert main(gen + ["--prompt", PROMPTS[0], "--vhr", str(out), "--var"]) == 0
    assert "edit: scale" in capsys.readouterr().out
    for extra, message in [(["--prompt", "describe", "--vhr", str(out)], "image placeholder"),
                           (["--prompt", PROMPTS[0], "--vhr", str(out), "--alpha", "0"], "--alpha must be"),
                           (["--prompt", PROMPTS[0], "--vhr", str(out), "--alpha", "nan"], "--alpha must be")]:
        assert main(gen + extra) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and message in err and "\n" not in err
    assert main(["score", "--task", "vhd", "--model", "retrieval", "--images", str(folder), "--prompts",
                 str(prompts)]) == 2
    assert "needs a vision-language model" in capsys.readouterr().err
