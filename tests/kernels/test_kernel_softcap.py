"""Logit softcapping, sliding windows and ALiBi biases in the streamed kernel, against a dense
float64 computation at twice the window length (Gemma 2: softcap and alternating local/global
layers; ALiBi, Press et al. 2022, as an additive bias)."""

import pytest
import torch

from headscope_kernels import attention_received, attention_with_stats

WINDOW = 6
N = 2 * WINDOW


def alibi_bias(H, n):
    """ALiBi: head h adds -m_h * (i - j) to the score of query i on key j, m_h = 2^(-8(h+1)/H)."""
    slopes = 2.0 ** (-8.0 * torch.arange(1, H + 1) / H)
    distance = torch.arange(n)[:, None] - torch.arange(n)[None, :]
    return -(slopes[:, None, None] * distance).unsqueeze(0)  # [1, H, n, n]


def dense(q, k, v, scaling, softcap, window, bias):
    G = q.shape[1] // k.shape[1]
    kd, vd = (t.double().repeat_interleave(G, 1) for t in (k, v))
    s = q.double() @ kd.transpose(-1, -2) * scaling
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + bias.double()
    pos = torch.arange(N)
    allowed = pos[None, :] <= pos[:, None]
    if window is not None:
        allowed &= (pos[:, None] - pos[None, :]) < window
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1)
    return p, p @ vd, torch.logsumexp(s.masked_fill(~allowed, float("-inf")), -1)


@pytest.mark.parametrize("softcap", [None, 1.5])
@pytest.mark.parametrize("window", [None, WINDOW])  # a global and a local layer
@pytest.mark.parametrize("alibi", [False, True])
def test_matches_dense_at_twice_the_window(softcap, window, alibi):
    torch.manual_seed(0)
    B, H, Hkv, d = 2, 4, 2, 8
    q, k, v = torch.randn(B, H, N, d) * 2, torch.randn(B, Hkv, N, d) * 2, torch.randn(B, Hkv, N, d)
    bias = alibi_bias(H, N) if alibi else None
    groups = torch.arange(N).remainder(3)
    stats = attention_with_stats(q, k, v, 0.5, causal=True, sliding_window=window, softcap=softcap, attn_mask=bias,
                                 key_groups=groups, num_groups=3, block_q=4, block_k=4,
                                 outputs=("out", "lse", "top1", "entropy", "group_mass"))
    p, out, lse = dense(q, k, v, 0.5, softcap, window, bias)
    torch.testing.assert_close(stats.out.double(), out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats.lse.double(), lse, atol=1e-5, rtol=1e-5)
    # a saturated softcap makes near-ties: the chosen key must carry the row's top weight
    top = p.gather(-1, stats.top1_index.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(top, p.amax(-1), atol=1e-6, rtol=0)
    entropy = -(p * p.clamp_min(1e-300).log()).sum(-1)
    torch.testing.assert_close(stats.entropy.double(), entropy, atol=1e-5, rtol=1e-5)
    onehot = (groups[:, None] == torch.arange(3)).double()
    torch.testing.assert_close(stats.group_mass.double(), p @ onehot, atol=1e-5, rtol=1e-5)
    received = attention_received(q, k, 0.5, stats.lse, causal=True, sliding_window=window, softcap=softcap,
                                  attn_mask=bias, block_q=4, block_k=4)
    torch.testing.assert_close(received.double(), p.sum(2), atol=1e-5, rtol=1e-5)


def test_softcap_changes_the_statistics():
    """The capped and uncapped attention differ on these inputs, so the test above has teeth."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, N, 8) * 2, torch.randn(1, 2, N, 8) * 2, torch.randn(1, 2, N, 8)
    capped, plain = (attention_with_stats(q, k, v, 0.5, causal=True, softcap=c, outputs=("entropy",)).entropy
                     for c in (1.5, None))
    assert (capped - plain).abs().max() > 0.05


@pytest.mark.parametrize("bad", [0.0, -1.0, "x"])
def test_bad_softcap_is_refused(bad):
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="softcap must be a positive float"):
        attention_with_stats(q, q, q, 1.0, softcap=bad)


def test_triton_refuses_softcap():
    triton_attention = pytest.importorskip("headscope_kernels.triton_attention")
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="does not support softcap"):
        triton_attention.forward(q, q, q, qscale=torch.ones(1), causal=True, q_offset=0, key_padding_mask=None,
                                 attn_mask=None, sliding_window=None, group_ids=None, num_groups=0, softcap=1.0)
