"""Bad input to headscope_kernels raises ValueError with a message that names the problem."""

import pytest
import torch

from headscope_kernels import attention_received, attention_with_stats


def _qkv(B=1, H=4, Hkv=2, Nq=5, Nk=7, d=8, dtype=torch.float32):
    return torch.randn(B, H, Nq, d, dtype=dtype), torch.randn(B, Hkv, Nk, d, dtype=dtype), \
        torch.randn(B, Hkv, Nk, d, dtype=dtype)


BAD_CALLS = [
    (dict(q=torch.randn(4, 5, 8)), "4-D tensor"),
    (dict(k=torch.randn(1, 3, 7, 8), v=torch.randn(1, 3, 7, 8)), "multiple of key/value heads"),
    (dict(k=torch.randn(1, 2, 7, 4)), "does not match q shape"),
    (dict(v=torch.randn(1, 2, 6, 8)), "does not match k shape"),
    (dict(q=torch.randn(1, 4, 5, 8, dtype=torch.float64)), "dtype"),
    (dict(outputs=("out", "attn")), "unknown output 'attn'"),
    (dict(backend="cuda"), "unknown backend"),
    (dict(key_padding_mask=torch.ones(1, 6, dtype=torch.bool)), "key_padding_mask has shape"),
    (dict(key_padding_mask=torch.ones(1, 7)), "bool tensor"),
    (dict(attn_mask=torch.ones(3, 5, 7, dtype=torch.bool)), "does not broadcast"),
    (dict(attn_mask=torch.ones(5, 7, dtype=torch.long)), "attn_mask must be a bool"),
    (dict(key_groups=torch.tensor([0, 1, 2, 0, 0, 0, 0]), num_groups=2), "ids must lie in"),
    (dict(key_groups=torch.tensor([0, -2, 0, 0, 0, 0, 0]), num_groups=2), "ids must lie in"),
    (dict(key_groups=torch.zeros(6, dtype=torch.long), num_groups=1), "key_groups has shape"),
    (dict(outputs=("group_mass",)), "needs key_groups"),
    (dict(head_scale=torch.ones(3)), "head_scale must be"),
    (dict(uniform_heads=torch.ones(4)), "uniform_heads must be a bool"),
    (dict(reweight=(0, 1, 0.5)), "reweight needs key_groups"),
    (dict(reweight=(0, 3, 0.5), key_groups=torch.zeros(7, dtype=torch.long), num_groups=2),
     "not a group id"),
    (dict(reweight=(0, 1, torch.ones(2)), key_groups=torch.zeros(7, dtype=torch.long), num_groups=2),
     "reweight p must be"),
    (dict(sliding_window=0), "sliding_window must be a positive int"),
    (dict(block_q=0), "block_q must be a positive int"),
    (dict(q_offset=1.5), "q_offset must be an int"),
    (dict(outputs=("match_mass",)), "needs key_match_ids"),
    (dict(key_match_ids=torch.zeros(1, 7, dtype=torch.long)), "come in pairs"),
    (dict(key_match_ids=torch.zeros(1, 7), query_match_ids=torch.zeros(1, 5)), "integer"),
    (dict(key_match_ids=torch.zeros(2, 1, 6, dtype=torch.long),
          query_match_ids=torch.zeros(2, 1, 5, dtype=torch.long)), "key_match_ids has shape"),
    (dict(key_match_ids=torch.zeros(1, 1, 7, dtype=torch.long),
          query_match_ids=torch.zeros(1, 3, 5, dtype=torch.long)), "query_match_ids has shape"),
    (dict(key_match_ids=torch.zeros(7, dtype=torch.long),
          query_match_ids=torch.zeros(5, dtype=torch.long)), "key_match_ids has shape"),
    (dict(key_match_ids=torch.zeros(2, 1, 7, dtype=torch.long),
          query_match_ids=torch.zeros(3, 1, 5, dtype=torch.long)), "same C"),
]


@pytest.mark.parametrize("override,message", BAD_CALLS)
def test_bad_input_raises_value_error(override, message):
    q, k, v = _qkv()
    args = dict(q=q, k=k, v=v)
    args.update({n: override.pop(n) for n in ("q", "k", "v") if n in override})
    with pytest.raises(ValueError, match=message):
        attention_with_stats(args["q"], args["k"], args["v"], 0.3, **override)


def test_mixed_dtypes_rejected():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="share a dtype"):
        attention_with_stats(q, k.half(), v.half(), 0.3)


@pytest.mark.parametrize("override,message", [
    (dict(query_range=(3, 9)), "query_range"),
    (dict(query_range=(4, 2)), "query_range"),
    (dict(lse=torch.zeros(1, 4, 6)), "lse must be a tensor of shape"),
    (dict(backend="gpu"), "unknown backend"),
])
def test_received_bad_input(override, message):
    q, k, _ = _qkv()
    with pytest.raises(ValueError, match=message):
        attention_received(q, k, 0.3, **override)


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    import headscope_kernels as hk

    q, k, v = _qkv()
    monkeypatch.setattr(hk, "_triton_module", lambda: None)
    with pytest.raises(ValueError, match="triton is not importable"):
        attention_with_stats(q, k, v, 0.3, backend="triton")

    class Compiled:          # importable, but not in interpreter mode
        INTERPRETED = False

    monkeypatch.setattr(hk, "_triton_module", lambda: Compiled)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        attention_with_stats(q, k, v, 0.3, backend="triton")

    class Interpreted:       # CPU tensors allowed, but no general attn_mask in the kernel
        INTERPRETED = True

    monkeypatch.setattr(hk, "_triton_module", lambda: Interpreted)
    with pytest.raises(ValueError, match="does not support a general attn_mask"):
        attention_with_stats(q, k, v, 0.3, attn_mask=torch.ones(5, 7, dtype=torch.bool), backend="triton")
