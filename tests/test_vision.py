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
                           (["--prompt", PROMPTS[0], "--vhr", str(out), "--alpha", "nan"], "--alpha: must be a finite number")]:
        assert main(gen + extra) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and message in err and "\n" not in err
    assert main(["score", "--task", "vhd", "--model", "retrieval", "--images", str(folder), "--prompts",
                 str(prompts)]) == 2
    assert "needs a vision-language model" in capsys.readouterr().err


# --------------------------------------------------------------------- the other analyzers on a VLM
def test_head_pursuit_over_image_tokens(hm):
    from headscope.analyzers.pursuit import concept_token_ids
    from headscope.analyzers.vision import image_head_pursuit, image_head_writes

    imgs = images(3)
    writes = image_head_writes(hm, imgs, PROMPTS, batch_size=2)
    # hand: z at the image positions of sample 1 (alone), mean, times that head's slice of o_proj
    batch = vision.encode(hm, imgs[1:2], PROMPTS[1:2])
    layer, head = 2, 3
    o_proj = hm.model.model.language_model.layers[layer].self_attn.o_proj
    seen = {}
    handle = o_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("z", a[0].clone()))
    try:
        with torch.no_grad():
            hm.model(**batch)
    finally:
        handle.remove()
    g = hm.geometry
    z = seen["z"][0].view(-1, g.n_heads, g.head_dim)[vision.image_mask(hm, batch["input_ids"])[0], head].mean(0)
    hand = z @ o_proj.weight[:, head * g.head_dim:(head + 1) * g.head_dim].T
    torch.testing.assert_close(writes[1, layer, head], hand, atol=1e-5, rtol=1e-5)
    concept = concept_token_ids(hm.tokenizer, ["red", "green", "blue"])
    scores = image_head_pursuit(hm, imgs, PROMPTS, concept, k=2)
    assert scores.scores.shape == (3, 8) and ((scores.scores >= 0) & (scores.scores <= 1 + 1e-6)).all()


def test_visual_sinks_from_massive_dims_on_image_tokens(llava_path, tmp_path):
    """A massive activation planted on one hidden dim of every image token (through the projector):
    the massive-activation search finds that dim, the sink analyzer marks the image tokens as visual
    sinks, and VAR finds the same sinks at prefill."""
    import transformers as tf

    from headscope.analyzers.sinks import visual_sinks
    from headscope.interventions import Edit
    from headscope.interventions.kinds.var import apply, massive_dims

    model = tf.LlavaForConditionalGeneration.from_pretrained(llava_path)
    with torch.no_grad():
        model.model.multi_modal_projector.linear_2.bias[7] = 5000.0
    model.save_pretrained(tmp_path / "massive")
    tf.AutoProcessor.from_pretrained(llava_path).save_pretrained(tmp_path / "massive")
    hm = HeadModel.load(tmp_path / "massive")
    batch = vision.encode(hm, images(1), PROMPTS[:1])
    dims = massive_dims(hm, batch)
    assert dims == [7]
    image = vision.image_mask(hm, batch["input_ids"])[0]
    inputs = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
    # phi is at most sqrt(d_model) = 8 here (64 on a 4096-wide LLaVA), so tau 20 is out of reach: 4
    sinks = visual_sinks(hm, batch["input_ids"][0].tolist(), dims, tau=4.0, first_layer=1, **inputs)
    assert sinks[1] and set(sinks[1]) <= set(image.nonzero().flatten().tolist())
    with torch.no_grad(), apply(hm, Edit("var", [], options={"dims": dims, "tau": 4.0, "first_layer": 1})) as run:
        hm.model(**batch)
    found = run.sinks[1][0] & image
    assert found.nonzero().flatten().tolist() == sinks[1]


def test_attention_on_image_and_text_after_image_equals_eager(hm, llava_path):
    """Retrieval statistics over the prompt's parts: per head, the mass on image tokens and on the
    text after the image, and the top-1 key, from the streamed pass = eager attention (batch 2,
    left-padded)."""
    import transformers as tf

    batch = vision.encode(hm, images(2), PROMPTS[:2])
    groups = vision.key_groups(hm, batch["input_ids"], batch["attention_mask"])
    with torch.no_grad(), hm.attention_stats(["group_mass", "top1"], key_groups=groups, num_groups=2) as rec:
        hm.model(**vision.with_positions(hm, batch))
    eager = tf.LlavaForConditionalGeneration.from_pretrained(llava_path, attn_implementation="eager").eval()
    with torch.no_grad():
        att = eager(**vision.with_positions(hm, batch), output_attentions=True).attentions  # L x [B, H, N, N]
    real = batch["attention_mask"].bool()
    for layer, A in enumerate(att):
        for g_id in (0, 1):
            expected = (A * (groups == g_id)[:, None, None, :]).sum(-1)  # [B, H, N]
            got = rec.group_mass()[layer, ..., g_id]
            torch.testing.assert_close(got.permute(0, 2, 1)[real], expected.permute(0, 2, 1)[real], atol=1e-5, rtol=0)
        last = rec.top1_index()[layer][..., -1]
        assert torch.equal(last, A[..., -1, :].argmax(-1))


def test_vhr_generate_prefill_choice_and_reselection(hm):
    from headscope.methods.vhr import default_layers, vhr_generate
    from headscope.interventions import Edit, intervene
    from headscope.scores import HeadScores

    image = images(1)[0]
    fixed, heads = vhr_generate(hm, image, PROMPTS[0], max_new_tokens=3)
    batch = vision.encode(hm, [image], PROMPTS[:1])
    vhd, txt = head_divergence(hm, batch)
    expected = select_heads(HeadScores(outlier_filter(vhd[0], txt[0]), method="vhd",
                                       params={"layers": default_layers(3)}))
    assert heads[0] == expected and all(h == expected for h in heads)
    again, steps = vhr_generate(hm, image, PROMPTS[0], max_new_tokens=3, reselect=True)
    assert steps[0] == expected and len(steps) == len(again)
    # step 1's heads: VHD of the prompt plus the first generated token
    ids = torch.cat([batch["input_ids"], again[:1].view(1, 1)], dim=1)
    vhd, txt = head_divergence(hm, dict(batch, input_ids=ids, attention_mask=torch.ones_like(ids)))
    assert steps[1] == select_heads(HeadScores(outlier_filter(vhd[0], txt[0]), method="vhd",
                                               params={"layers": default_layers(3)}))
    assert int(again[0]) == int(fixed[0])  # the first token uses the same prefill heads
    with pytest.raises(HeadscopeError, match="alpha must be a finite non-zero"):
        vhr_generate(hm, image, PROMPTS[0], alpha=0.0)
