"""Attention statistics through headscope's attention function equal eager attention."""

import pytest
import torch
from conftest import tiny_model

from headscope.errors import HeadscopeError
from headscope.model import HeadModel


def eager_attentions(model, **inputs):
    """Reference: the [B, H, q, k] pattern per layer from transformers' eager attention."""
    impl = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return torch.stack(model(**inputs, output_attentions=True).attentions)
    finally:
        model.set_attn_implementation(impl)


def entropy(p):
    return -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_decoder_stats_equal_eager(kind):
    model = tiny_model(kind)
    hm = HeadModel(model)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    groups = torch.full((2, 24), -1)
    groups[:, 3:8] = 0  # e.g. a needle span
    groups[:, 0] = 1  # e.g. a sink
    pattern = eager_attentions(model, input_ids=ids)  # [L, B, H, q, k]
    with torch.no_grad(), hm.attention_stats(["top1", "group_mass", "entropy"], key_groups=groups, num_groups=2) as rec:
        logits = model(ids).logits
    assert torch.equal(rec.top1_index(), pattern.argmax(-1))
    mass = rec.group_mass()
    torch.testing.assert_close(mass[..., 0], pattern[..., 3:8].sum(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(mass[..., 1], pattern[..., 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(rec.stacked("entropy"), entropy(pattern), atol=1e-5, rtol=0)
    # recording must not change the model's output
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, logits, atol=1e-5, rtol=1e-5)
    assert not hm.hooks_installed() and model.config._attn_implementation == "sdpa"


def test_selected_rows_and_left_padding_llama():
    model = tiny_model("llama")
    hm = HeadModel(model)
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :5] = 0  # left padding in the second row
    pattern = eager_attentions(model, input_ids=ids, attention_mask=mask)
    with torch.no_grad(), hm.attention_stats(["top1"], query_rows=(12, 20)) as rec:
        model(ids, attention_mask=mask)
    assert rec.row_start() == 12
    assert torch.equal(rec.top1_index(), pattern[..., 12:20, :].argmax(-1))
    assert (rec.top1_index()[:, 1] >= 5).all()  # padding is never attended


def test_decode_step_with_kv_cache_equals_full_forward():
    model = tiny_model("llama")
    hm = HeadModel(model)
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(3))
    pattern = eager_attentions(model, input_ids=ids)
    with torch.no_grad():
        cache = model(ids[:, :-1], use_cache=True).cache
        with hm.attention_stats(["top1", "group_mass"], key_groups=torch.arange(16) % 2, num_groups=2) as rec:
            model(ids[:, -1:], cache=cache, use_cache=True)
    assert rec.row_start() == 15
    assert torch.equal(rec.top1_index()[..., 0], pattern[..., -1, :].argmax(-1))
    torch.testing.assert_close(rec.group_mass()[..., 0, 1], pattern[..., -1, 1::2].sum(-1), atol=1e-5, rtol=0)


def test_real_minilm_encoder_stats_equal_eager(minilm_path):
    hm = HeadModel.load(minilm_path)
    assert type(hm.model).__name__ == "BertModel"
    g = hm.geometry
    assert (g.n_layers, g.n_heads, g.n_kv_heads, g.head_dim, g.causal) == (6, 12, 12, 32, False)
    batch = hm.tokenizer(["The cat sat on the mat.", "Attention heads in a small encoder model."],
                         padding=True, return_tensors="pt")
    pattern = eager_attentions(hm.model, **batch)
    n = batch["input_ids"].shape[1]
    groups = torch.full((n,), -1)
    groups[0] = 0  # [CLS]
    with torch.no_grad(), hm.attention_stats(["top1", "group_mass"], key_groups=groups, num_groups=1) as rec:
        hm.model(**batch)
    real = batch["attention_mask"].bool()  # compare real query rows only
    top1 = rec.top1_index().permute(1, 3, 0, 2)[real]
    assert torch.equal(top1, pattern.argmax(-1).permute(1, 3, 0, 2)[real])
    mass = rec.group_mass()[..., 0].permute(1, 3, 0, 2)[real]
    torch.testing.assert_close(mass, pattern[..., 0].permute(1, 3, 0, 2)[real], atol=1e-5, rtol=0)


def test_llava_language_model_is_hooked_not_the_vision_tower():
    model = tiny_model("llava")
    hm = HeadModel(model)
    g = hm.geometry
    assert (g.n_layers, g.n_heads, g.n_kv_heads, g.head_dim) == (2, 4, 2, 16)
    assert all(".language_model." in name for name, mod in model.named_modules()
               if any(mod is lm.attention for lm in hm._layers))
    ids = torch.randint(0, 140, (1, 12), generator=torch.Generator().manual_seed(4))
    pattern = eager_attentions(model, input_ids=ids)
    with torch.no_grad(), hm.attention_stats(["top1"]) as rec:
        model(input_ids=ids)
    assert torch.equal(rec.top1_index(), pattern.argmax(-1))


def test_stats_requests_are_validated():
    hm = HeadModel(tiny_model("llama"))
    with pytest.raises(HeadscopeError, match="unknown statistic"):
        with hm.attention_stats(["pattern"]):
            pass
    with pytest.raises(HeadscopeError, match="key_groups"):
        with hm.attention_stats(["group_mass"]):
            pass
    with pytest.raises(HeadscopeError, match="nested"):
        with hm.attention_stats(["top1"]), hm.attention_stats(["top1"]):
            pass
    assert not hm.hooks_installed()


def test_unsupported_architecture_is_named():
    import transformers as tf

    with pytest.raises(HeadscopeError, match="needs a transformers PreTrainedModel; got Sequential"):
        HeadModel(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    mamba = tf.MambaForCausalLM(tf.MambaConfig(hidden_size=16, num_hidden_layers=1, vocab_size=32, state_size=4))
    with pytest.raises(HeadscopeError, match="cannot find the attention layers of MambaForCausalLM"):
        HeadModel(mamba)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_attention_received_equals_eager_column_sums(kind):
    model = tiny_model(kind)
    hm = HeadModel(model)
    ids = torch.randint(0, 128, (2, 18), generator=torch.Generator().manual_seed(5))
    pattern = eager_attentions(model, input_ids=ids)
    with torch.no_grad(), hm.attention_stats(["received"], query_rows=(6, 18)) as rec:
        model(ids)
    torch.testing.assert_close(rec.stacked("received"), pattern[..., 6:18, :].sum(-2), atol=1e-5, rtol=0)
