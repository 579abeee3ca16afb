"""Edits as data, and each edit kind against a hand computation on a tiny random-init Llama (GQA)."""

import copy

import pytest
import torch

from conftest import tiny_model
from headscope.errors import HeadscopeError
from headscope.interventions import Edit, edits_from_scores, intervene, load_edits, save_edits
from headscope.model import HeadModel
from headscope.scores import HeadScores

D = 16  # head_dim of the tiny llama (64 / 4)


@pytest.fixture(scope="module")
def hm():
    return HeadModel(tiny_model("llama"))


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))


def _with_oproj(hm, fn, ids):
    """Reference run: our own o_proj pre-hook replaces z [B, S, H, d] by fn(layer, z)."""
    handles = []
    for layer, block in enumerate(hm.model.model.layers):
        def pre(module, args, layer=layer):
            z = args[0].view(*args[0].shape[:-1], 4, D)
            return (fn(layer, z.clone()).reshape(args[0].shape),)
        handles.append(block.self_attn.o_proj.register_forward_pre_hook(pre))
    try:
        return hm.model(ids).logits
    finally:
        for h in handles:
            h.remove()


def _logits(hm, edits, ids, **kw):
    with intervene(hm, edits, **kw):
        return hm.model(ids).logits


# ------------------------------------------------------------------ data
def test_edit_data_roundtrip(tmp_path):
    edits = [
        Edit("zero", [(0, 1), (1, 2)], positions="last", scope="decode"),
        Edit("scale", [(1, 0)], strength=-1.5, positions=(2, 5)),
        Edit("resample", [(0, 0)], source=[[1, 2, 3]]),
        Edit("uniform", [(1, 3)], strength=torch.tensor(1.0)),
    ]
    assert edits[2].kind == "patch"
    assert "scale" in repr(edits[1]) and "-1.5" in repr(edits[1])
    path = save_edits(edits, tmp_path / "edits.json")
    back = load_edits(path)
    assert back == edits
    assert back[0] != edits[1]
    assert Edit("zero", [(0, 1)]) != Edit("zero", [(0, 1)], strength=0.5)
    composed = edits[0] + edits[1]
    assert composed == edits[:2]


def test_edit_bad_input(hm, tmp_path):
    with pytest.raises(HeadscopeError, match="unknown edit kind"):
        Edit("melt", [(0, 0)])
    with pytest.raises(HeadscopeError, match="positions"):
        Edit("zero", [(0, 0)], positions=(5, 2))
    with pytest.raises(HeadscopeError, match="scope"):
        Edit("zero", [(0, 0)], scope="sometimes")
    with pytest.raises(HeadscopeError, match="source"):
        Edit("mean", [(0, 0)])
    with pytest.raises(HeadscopeError, match="one per head"):
        Edit("scale", [(0, 0), (0, 1)], strength=[1.0, 2.0, 3.0])
    with pytest.raises(HeadscopeError, match="invalid head"):
        with intervene(hm, Edit("zero", [(5, 0)])):
            pass
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(HeadscopeError, match="not valid JSON"):
        load_edits(tmp_path / "bad.json")
    assert not hm.hooks_installed()


def test_edits_from_scores(tmp_path):
    scores = HeadScores(torch.tensor([[0.1, 0.9, 0.0, 0.3], [0.5, 0.05, 0.2, 0.8]]), method="retrieval")
    assert edits_from_scores(scores, "uniform", top=2).heads == ((0, 1), (1, 3))
    assert edits_from_scores(scores, "zero", threshold=0.4).heads == ((0, 1), (1, 3), (1, 0))
    path = scores.to_csv(tmp_path / "r.csv")
    e = edits_from_scores(path, "scale", top=1, strength=-1.0)
    assert e == Edit("scale", [(0, 1)], strength=-1.0)
    assert edits_from_scores(None, "zero", heads=[(1, 1)]).heads == ((1, 1),)
    with pytest.raises(HeadscopeError, match="exactly one"):
        edits_from_scores(scores, "zero", top=1, threshold=0.1)


# ------------------------------------------------------------------ kinds vs hand computation
def test_zero_is_head_output_zero(hm, ids):
    def ref(layer, z):
        if layer == 1:
            z[:, :, 2] = 0
        return z
    got = _logits(hm, Edit("zero", [(1, 2)]), ids)
    torch.testing.assert_close(got, _with_oproj(hm, ref, ids), atol=1e-5, rtol=1e-5)
    assert (got - hm.model(ids).logits).abs().max() > 1e-4  # the edit does something


def test_scale_and_positions(hm, ids):
    def ref(layer, z):
        if layer == 0:
            z[:, 3:6, 1] *= -2.0
            z[:, 3:6, 3] *= 0.5
        return z
    e = Edit("scale", [(0, 1), (0, 3)], strength=[-2.0, 0.5], positions=(3, 6))
    torch.testing.assert_close(_logits(hm, e, ids), _with_oproj(hm, ref, ids), atol=1e-5, rtol=1e-5)

    def ref_last(layer, z):
        if layer == 1:
            z[:, -1, 0] *= 3.0
        return z
    e = Edit("scale", [(1, 0)], strength=3.0, positions="last")
    torch.testing.assert_close(_logits(hm, e, ids), _with_oproj(hm, ref_last, ids), atol=1e-5, rtol=1e-5)


def test_patch_is_source_value(hm, ids):
    source = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(7))
    with hm.capture_z([0]) as cap:
        hm.model(source)
    src = cap.z[0]

    def ref(layer, z):
        if layer == 0:
            z[:, 2:8, 3] = src[:, 2:8, 3]
        return z
    e = Edit("patch", [(0, 3)], positions=(2, 8), source=source)
    torch.testing.assert_close(_logits(hm, e, ids), _with_oproj(hm, ref, ids), atol=1e-5, rtol=1e-5)
    with pytest.raises(HeadscopeError, match="patch source has 10 positions"):
        _logits(hm, Edit("patch", [(0, 3)], source=source), torch.randint(0, 128, (1, 12)))
    assert not hm.hooks_installed()


def test_mean_over_reference(hm, ids):
    reference = torch.randint(0, 128, (3, 7), generator=torch.Generator().manual_seed(3))
    with hm.capture_z([1]) as cap:
        hm.model(reference)
    mean = cap.z[1][:, :, 2].reshape(-1, D).mean(0)

    def ref(layer, z):
        if layer == 1:
            z[:, :, 2] = 0.25 * z[:, :, 2] + 0.75 * mean
        return z
    e = Edit("mean", [(1, 2)], strength=0.75, source=reference)
    torch.testing.assert_close(_logits(hm, e, ids), _with_oproj(hm, ref, ids), atol=1e-5, rtol=1e-5)


def test_uniform_is_mean_of_values_over_prefix(hm, ids):
    """Uniform attention: z[p, h] = mean over keys j <= p of v[j, kv(h)] (GQA: kv = h // 2)."""
    values = {}
    handle = hm.model.model.layers[1].self_attn.v_proj.register_forward_hook(
        lambda m, a, out: values.__setitem__("v", out.detach().view(*out.shape[:-1], 2, D))
    )
    try:
        hm.model(ids)
    finally:
        handle.remove()
    v = values["v"][:, :, 3 // 2]  # head 3 reads kv head 1
    prefix_mean = v.cumsum(1) / torch.arange(1, ids.shape[1] + 1).view(1, -1, 1)

    def ref(layer, z):
        if layer == 1:
            z[:, :, 3] = prefix_mean
        return z
    # layer 1's inputs are unaffected by a layer-1 edit, so v above is the edited run's v
    got = _logits(hm, Edit("uniform", [(1, 3)]), ids)
    torch.testing.assert_close(got, _with_oproj(hm, ref, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,strength,factor", [("query_scale", 0.3, 0.3), ("query_scale", 1e-4, 1e-4),
                                                   ("uniform", 1.0, 0.0), ("uniform", 0.4, 0.6)])
def test_query_edits_equal_scaled_q_proj(hm, ids, kind, strength, factor):
    """Scaling a head's query = scaling its rows of q_proj (RoPE is linear)."""
    ref = copy.deepcopy(hm.model)
    with torch.no_grad():
        ref.model.layers[0].self_attn.q_proj.weight[2 * D : 3 * D] *= factor
    got = _logits(hm, Edit(kind, [(0, 2)], strength=strength), ids)
    torch.testing.assert_close(got, ref(ids).logits, atol=1e-5, rtol=1e-5)


def test_strength_is_differentiable(hm, ids):
    for kind, value in (("scale", 0.7), ("zero", 0.5), ("uniform", 0.5), ("query_scale", 0.5)):
        alpha = torch.tensor(value, requires_grad=True)
        loss = _logits(hm, Edit(kind, [(0, 1), (1, 2)], strength=alpha), ids).logsumexp(-1).mean()
        loss.backward()
        assert alpha.grad is not None and alpha.grad.abs() > 0, kind
    per_head = torch.tensor([1.0, 2.0], requires_grad=True)
    _logits(hm, Edit("scale", [(0, 1), (1, 2)], strength=per_head), ids).sum().backward()
    assert (per_head.grad.abs() > 0).all()
    assert not hm.hooks_installed()


def test_edits_compose_in_order(hm, ids):
    def ref(layer, z):
        if layer == 0:
            z[:, :, 1] = 0.5 * (2.0 * z[:, :, 1])
        return z
    edits = [Edit("scale", [(0, 1)], strength=2.0), Edit("zero", [(0, 1)], strength=0.5)]
    torch.testing.assert_close(_logits(hm, edits, ids), _with_oproj(hm, ref, ids), atol=1e-5, rtol=1e-5)
