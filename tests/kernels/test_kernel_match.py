"""match_mass through HeadModel on a real (tiny, random-init) model equals eager attention."""

import torch
from conftest import tiny_model

from headscope.model import HeadModel


def test_previous_token_match_mass_equals_eager_subdiagonal():
    model = tiny_model("llama")
    hm = HeadModel(model)
    B, N = 2, 20
    ids = torch.randint(0, 128, (B, N), generator=torch.Generator().manual_seed(2))
    pos = torch.arange(N).expand(B, N)
    keys, queries = pos[None], (pos - 1)[None]  # [C=1, B, N]: key id j, query id i - 1
    with torch.no_grad(), hm.attention_stats(["match_mass"], match_ids=(keys, queries)) as rec:
        model(ids)
    mass = rec.stacked("match_mass")[..., 0]  # [L, B, H, N]

    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            pattern = torch.stack(model(ids, output_attentions=True).attentions)  # [L, B, H, N, N]
    finally:
        model.set_attn_implementation("sdpa")
    want = torch.diagonal(pattern, offset=-1, dim1=-2, dim2=-1)  # A[i, i - 1], i = 1..N-1
    assert (mass[..., 0] == 0).all()  # query 0 has no previous token
    torch.testing.assert_close(mass[..., 1:], want, atol=1e-5, rtol=0)
