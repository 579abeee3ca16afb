"""Image-text families beyond LLaVA (random-init, tiny): each loads into HeadModel, hooks its language
model (not its vision tower), and runs VHD and VHR. Inputs are built by hand in each family's format
(no processors: they would need tokenizer files)."""

import pytest
import torch

from headscope import HeadModel
from headscope.analyzers.vision import head_divergence
from headscope.interventions import Edit, intervene

IMAGE = 290


def _text(**extra):
    return dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, vocab_size=300, max_position_embeddings=512, **extra)


def _family(name):
    import transformers as tf

    g = torch.Generator().manual_seed(0)
    qwen_vision = dict(depth=1, hidden_size=32, num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    if name in ("qwen2_vl", "qwen2_5_vl"):
        mrope = _text(rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
        if name == "qwen2_vl":
            config = tf.Qwen2VLConfig(text_config=mrope, vision_config=dict(qwen_vision, embed_dim=32, hidden_size=64),
                                      image_token_id=IMAGE, video_token_id=291, vision_start_token_id=292,
                                      vision_end_token_id=293)
        else:
            config = tf.Qwen2_5_VLConfig(text_config=mrope, vision_config=dict(
                qwen_vision, out_hidden_size=64, intermediate_size=64, fullatt_block_indexes=[0]),
                image_token_id=IMAGE, video_token_id=291, vision_start_token_id=292, vision_end_token_id=293)
        ids = torch.tensor([[5, 6, 292] + [IMAGE] * 4 + [293, 7, 8, 9]])  # 4x4 patches, merged 2x2
        inputs = dict(pixel_values=torch.randn(16, 3 * 2 * 14 * 14, generator=g),
                      image_grid_thw=torch.tensor([[1, 4, 4]]), mm_token_type_ids=(ids == IMAGE).long())
    elif name in ("idefics3", "smolvlm"):
        cls = tf.Idefics3Config if name == "idefics3" else tf.SmolVLMConfig
        config = cls(text_config=_text(), vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=2, image_size=32, patch_size=8), image_token_id=IMAGE, scale_factor=2)
        ids = torch.tensor([[5, 6] + [IMAGE] * 4 + [7, 8, 9]])
        inputs = dict(pixel_values=torch.randn(1, 1, 3, 32, 32, generator=g),
                      pixel_attention_mask=torch.ones(1, 1, 32, 32, dtype=torch.bool))
    elif name == "gemma3":
        config = tf.Gemma3Config(text_config=dict(_text(), head_dim=16, sliding_window=16), vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
            patch_size=8), mm_tokens_per_image=4, image_token_index=IMAGE, boi_token_index=291, eoi_token_index=292)
        ids = torch.tensor([[5, 291] + [IMAGE] * 4 + [292, 7, 8, 9]])
        inputs = dict(pixel_values=torch.randn(1, 3, 32, 32, generator=g), token_type_ids=(ids == IMAGE).long())
    elif name == "llava_next":
        config = tf.LlavaNextConfig(text_config=dict(_text(), model_type="llama"), vision_config=dict(
            model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, image_size=32, patch_size=8), image_token_index=IMAGE,
            image_grid_pinpoints=[[32, 32], [32, 64]])
        ids = None
        inputs = dict(pixel_values=torch.randn(1, 3, 3, 32, 32, generator=g), image_sizes=torch.tensor([[32, 64]]))
    torch.manual_seed(0)
    model = tf.AutoModelForImageTextToText.from_config(config).eval()
    model.set_attn_implementation("sdpa")
    if ids is None:  # LLaVA-NeXT: as many image tokens as its any-resolution features
        with torch.no_grad():
            feats = model.model.get_image_features(**inputs)
        n = sum(f.shape[0] for f in getattr(feats, "pooler_output", feats))
        ids = torch.tensor([[5, 6] + [IMAGE] * n + [7, 8, 9]])
    return model, dict(inputs, input_ids=ids, attention_mask=torch.ones_like(ids))


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm", "gemma3", "llava_next"])
def test_family_loads_hooks_and_runs_vhd_and_vhr(name):
    model, batch = _family(name)
    hm = HeadModel(model)
    assert all("vision" not in n and "visual" not in n for n, m in model.named_modules()
               if any(m is lm.attention for lm in hm._layers))
    vhd, txt = head_divergence(hm, batch)
    assert vhd.shape == (1, 2, 4) and torch.isfinite(vhd).all() and (vhd > 0).all()
    kwargs = dict(max_new_tokens=2, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        base = torch.stack(model.generate(**batch, **kwargs).logits)
        with intervene(hm, Edit("scale", [(1, int(vhd[0, 1].argmax()))], strength=2.0)):
            vhr = torch.stack(model.generate(**batch, **kwargs).logits)
    assert (vhr - base).abs().max() > 1e-4
    assert not hm.hooks_installed()
