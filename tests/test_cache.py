"""run_with_cache under TransformerLens names equals TransformerLens 4's run_with_cache on the bridge."""

import copy

import pytest
import torch

from headscope.cache import hook_names, run_with_cache
from headscope.errors import HeadscopeError
from headscope.interop import bridge_from_hf
from headscope.model import HeadModel


@pytest.fixture(scope="module")
def pair():
    pytest.importorskip("transformer_lens")
    hm = HeadModel.load("multitask")  # Llama, GQA (4 query / 2 kv heads), RoPE, attention biases
    bridge = bridge_from_hf(copy.deepcopy(hm.model), hm.tokenizer)
    return hm, bridge


def test_cache_equals_transformer_lens_bridge(pair):
    hm, bridge = pair
    ids = torch.tensor([hm.tokenizer("ind saa sab sac sad saa sab")["input_ids"], hm.tokenizer("kv kaa vab kac vad ? kaa")["input_ids"]])
    logits, cache = hm.run_with_cache(ids)
    with torch.no_grad():
        tl_logits, tl_cache = bridge.run_with_cache(ids)
    names = hook_names(hm.geometry.n_layers)
    assert set(cache) == set(names)
    for name in names:
        assert cache[name].shape == tl_cache[name].shape, name
        torch.testing.assert_close(cache[name], tl_cache[name], atol=1e-5, rtol=0, msg=name)
    torch.testing.assert_close(logits, tl_logits, atol=1e-5, rtol=0)
    assert not hm.hooks_installed()


def test_cache_filter_and_limits(organism):
    ids = torch.tensor([organism.tokenizer("The secret number")["input_ids"]])
    _, only = run_with_cache(organism, ids, names_filter=lambda n: n.endswith("hook_z"))
    assert sorted(only) == [f"blocks.{l}.attn.hook_z" for l in range(4)]
    _, listed = run_with_cache(organism, ids, names_filter=["blocks.1.attn.hook_pattern"])
    pattern = listed["blocks.1.attn.hook_pattern"]
    torch.testing.assert_close(pattern.sum(-1), torch.ones(pattern.shape[:-1]))  # rows are distributions
    assert torch.all(pattern.triu(1) == 0)  # causal
    with pytest.raises(HeadscopeError, match="limited to 3 tokens.*attention_stats"):
        run_with_cache(organism, ids, max_pattern_tokens=3)
    with pytest.raises(HeadscopeError, match="unknown hook name"):
        run_with_cache(organism, ids, names_filter=["blocks.0.attn.hook_nothing"])
    assert not organism.hooks_installed()
