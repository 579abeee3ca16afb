"""Head ablation and z capture against hand computations; hooks always removed."""

import pytest
import torch
from conftest import tiny_model

from headscope.errors import HeadscopeError
from headscope.model import HeadModel

IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))


def test_capture_z_is_the_o_proj_input():
    model = tiny_model("llama")
    hm = HeadModel(model)
    seen = {}
    handle = model.model.layers[1].self_attn.o_proj.register_forward_pre_hook(
        lambda mod, args: seen.setdefault("z", args[0].detach().clone()))
    try:
        with torch.no_grad(), hm.capture_z(layers=[1], positions="last") as cap:
            model(IDS)
    finally:
        handle.remove()
    assert cap.z[1].shape == (2, 1, 4, 16)
    torch.testing.assert_close(cap.z[1][:, 0], seen["z"][:, -1].view(2, 4, 16))


def test_zero_ablation_equals_zeroing_the_head_slice_by_hand():
    model = tiny_model("llama")
    hm = HeadModel(model)

    def zero_head_2(mod, args):
        z = args[0].clone()
        z[..., 2 * 16 : 3 * 16] = 0  # head 2 of layer 1
        return (z,)

    handle = model.model.layers[1].self_attn.o_proj.register_forward_pre_hook(zero_head_2)
    try:
        with torch.no_grad():
            expected = model(IDS).logits
    finally:
        handle.remove()
    with torch.no_grad():
        base = model(IDS).logits
        with hm.ablate([(1, 2)], mode="zero"):
            ablated = model(IDS).logits
    torch.testing.assert_close(ablated, expected)
    assert not torch.allclose(ablated, base)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_uniform_ablation_gives_the_mean_of_values_over_the_prefix(kind):
    model = tiny_model(kind)
    hm = HeadModel(model)
    attn = hm._layers[0].attention
    values = {}
    def keep_values(module, args, out):
        values["v"] = out.detach() if kind == "llama" else out[..., 128:].detach()  # GPT-2 fuses q,k,v

    hook = (attn.v_proj if kind == "llama" else attn.c_attn).register_forward_hook(keep_values)
    try:
        with torch.no_grad(), hm.ablate([(0, 1)], mode="uniform"), hm.capture_z(layers=[0]) as cap:
            model(IDS)
    finally:
        hook.remove()
    kv_head = 1 // (hm.geometry.n_heads // hm.geometry.n_kv_heads)
    v = values["v"].view(2, 10, hm.geometry.n_kv_heads, 16)[:, :, kv_head]  # [B, S, d]
    prefix_mean = v.cumsum(1) / torch.arange(1, 11).view(1, 10, 1)
    torch.testing.assert_close(cap.z[0][:, :, 1], prefix_mean, atol=1e-5, rtol=1e-5)


def test_hooks_are_removed_after_an_exception():
    model = tiny_model("llama")
    hm = HeadModel(model)
    with torch.no_grad():
        base = model(IDS).logits
        with pytest.raises(RuntimeError, match="boom"):
            with hm.ablate([(0, 0), (1, 3)], mode="zero"), hm.attention_stats(["top1"]):
                model(IDS)
                assert hm.hooks_installed()
                raise RuntimeError("boom")
        assert not hm.hooks_installed()
        assert model.config._attn_implementation == "sdpa"
        assert all(not m.out_proj._forward_pre_hooks for m in hm._layers)
        torch.testing.assert_close(model(IDS).logits, base)


def test_ablation_during_generate_and_cleanup():
    model = tiny_model("llama")
    hm = HeadModel(model)
    with torch.no_grad():
        plain = model.generate(IDS[:1], max_new_tokens=5, do_sample=False, pad_token_id=0)
        with hm.ablate(hm.all_heads(), mode="zero"):
            ablated = model.generate(IDS[:1], max_new_tokens=5, do_sample=False, pad_token_id=0)
        again = model.generate(IDS[:1], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(plain, again)
    assert not torch.equal(plain, ablated)


def test_invalid_heads_are_rejected_with_ranges():
    hm = HeadModel(tiny_model("llama"))
    with pytest.raises(HeadscopeError, match=r"invalid head\(s\) L2H0: .*layers 0..1 and heads 0..3"):
        with hm.ablate([(2, 0)]):
            pass
    with pytest.raises(HeadscopeError, match="unknown ablation mode"):
        with hm.ablate([(0, 0)], mode="mean-ish"):
            pass
    assert not hm.hooks_installed()


def test_per_row_query_scales_equal_separate_runs():
    model = tiny_model("llama")
    hm = HeadModel(model)
    ids = IDS[:1].repeat(2, 1)
    scale = torch.ones(2, 4)
    scale[1, 3] = 0.0  # row 1: head 3 of layer 0 uniform; row 0 untouched
    with torch.no_grad():
        with hm.scale_queries(0, scale):
            both = model(ids).logits
        plain = model(ids[:1]).logits
        with hm.ablate([(0, 3)], mode="uniform"):
            ablated = model(ids[:1]).logits
    torch.testing.assert_close(both[0], plain[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[1], ablated[0], atol=1e-5, rtol=1e-5)
