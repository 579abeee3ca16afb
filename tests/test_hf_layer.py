"""headscope/hf/: the one rule for each Hugging Face detail, against hand-computed values."""

from types import SimpleNamespace

import pytest
import torch

from headscope.errors import HeadscopeError
from headscope.hf import adapters, inputs


def test_unknown_layout_error_names_where_the_row_goes():
    blob = torch.nn.Sequential(torch.nn.Linear(2, 2))
    blob.config = SimpleNamespace(model_type="blob")
    with pytest.raises(HeadscopeError, match=r"Add a row for it to ADAPTERS in headscope/hf/adapters\.py"):
        adapters.find_layers(blob)


def test_left_padded_positions_count_from_the_first_real_token():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 0, 1]])
    # by hand: padding gets 0, real tokens count 0, 1, 2, ... (a gap inside a row keeps its count)
    want = torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 1, 1, 2]])
    assert torch.equal(inputs.left_padded_positions(mask), want)


def test_with_positions_only_where_padding_needs_them():
    llama, qwen = SimpleNamespace(model_type="llama"), SimpleNamespace(model_type="qwen2_vl")
    padded = {"input_ids": torch.ones(1, 3, dtype=torch.long), "attention_mask": torch.tensor([[0, 1, 1]])}
    assert torch.equal(inputs.with_positions(llama, padded)["position_ids"], torch.tensor([[0, 0, 1]]))
    assert "position_ids" not in inputs.with_positions(qwen, padded)  # M-RoPE: the model computes its own
    full = {"input_ids": torch.ones(1, 3, dtype=torch.long), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    assert inputs.with_positions(llama, full) is full


def test_pad_id_rule():
    assert inputs.pad_id(SimpleNamespace(pad_token_id=7, eos_token_id=2)) == 7
    assert inputs.pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=2)) == 2
    assert inputs.pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0
    assert inputs.pad_id(None) == 0


def test_cached_length_reads_either_cache_name():
    class Cache:
        def get_seq_length(self):
            return 5

    assert inputs.cached_length({"cache": Cache()}) == 5
    assert inputs.cached_length({"past_key_values": Cache()}) == 5
    assert inputs.cached_length({"past_key_values": None}) == 0
    assert inputs.cached_length({}) == 0
