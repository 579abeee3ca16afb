"""Edits run as plain nnsight 0.8 traces and as TransformerLens 4.3 bridge hooks equal headscope's own."""

import copy

import pytest
import torch

from conftest import tiny_model
from headscope.errors import HeadscopeError
from headscope.interop import (
    apply_edits_nnsight,
    bridge_from_hf,
    bridge_hooks,
    nnsight_model,
    nnsight_plan,
    nnsight_sources,
)
from headscope.interventions import Edit, intervene
from headscope.model import HeadModel
from headscope.zoo.training import build_word_tokenizer

G = torch.Generator().manual_seed(2)
IDS = torch.randint(0, 128, (2, 9), generator=G)
SOURCE = torch.randint(0, 128, (1, 9), generator=G)
REFERENCE = torch.randint(0, 128, (3, 6), generator=G)

CASES = {
    "zero": [Edit("zero", [(0, 1), (1, 3)])],
    "scale": [Edit("scale", [(1, 0), (0, 2)], strength=[-1.0, 3.0], positions=(2, 7))],
    "mean": [Edit("mean", [(1, 2)], strength=0.8, source=REFERENCE)],
    "patch": [Edit("patch", [(0, 3)], positions="last", source=SOURCE)],
    "composed": [Edit("scale", [(0, 1)], strength=2.0), Edit("zero", [(0, 1), (1, 1)], strength=0.5)],
}


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def models(request):
    model = tiny_model(request.param)
    tok = build_word_tokenizer(["a b c"])
    return HeadModel(model, tok), nnsight_model(model, tok)


def _headscope(hm, edits):
    with torch.no_grad(), intervene(hm, edits):
        return hm.model(IDS).logits


@pytest.mark.parametrize("case", sorted(CASES))
def test_nnsight_trace_matches_headscope(models, case):
    hm, lm = models
    edits = CASES[case]
    sources = nnsight_sources(lm, edits)
    with torch.no_grad(), lm.trace(IDS):
        apply_edits_nnsight(lm, edits, IDS.shape, sources=sources)
        logits = lm.output.logits.save()
    ref = _headscope(hm, edits)
    assert (torch.as_tensor(logits) - ref).abs().max() < 1e-5
    assert (ref - hm.model(IDS).logits).abs().max() > 1e-4  # the edit did something
    assert not hm.hooks_installed()


def test_nnsight_rejects_query_edits(models):
    _, lm = models
    with pytest.raises(HeadscopeError, match="attention hook"):
        with lm.trace(IDS):
            apply_edits_nnsight(lm, [Edit("uniform", [(0, 0)])], IDS.shape)


@pytest.fixture(scope="module")
def bridge_pair():
    model = tiny_model("llama")
    return HeadModel(model), bridge_from_hf(copy.deepcopy(model))


@pytest.mark.parametrize("case", sorted(CASES))
def test_transformer_lens_bridge_matches_headscope(bridge_pair, case):
    hm, bridge = bridge_pair
    edits = CASES[case]
    with torch.no_grad():
        got = bridge.run_with_hooks(IDS, return_type="logits", fwd_hooks=bridge_hooks(bridge, edits))
        plain = bridge(IDS, return_type="logits")
    ref = _headscope(hm, edits)
    base = hm.model(IDS).logits
    assert (plain - base).abs().max() < 1e-5
    assert (got - ref).abs().max() < 1e-5
    assert (ref - base).abs().max() > 1e-3


BAD_EDITS = {"head outside the grid": (Edit("zero", [(0, 9)]), "invalid head"),
             "source id outside the vocabulary": (Edit("patch", [(0, 1)], source=torch.tensor([[10 ** 6]])),
                                                  "outside this model's vocabulary")}


@pytest.mark.parametrize("case", sorted(BAD_EDITS))
def test_nnsight_checks_edits_against_the_model_before_the_trace(models, case):
    """Checked as intervene checks them: one HeadscopeError, before nnsight runs anything."""
    _, lm = models
    edit, message = BAD_EDITS[case]
    with pytest.raises(HeadscopeError, match=message):
        nnsight_sources(lm, [edit])
    with pytest.raises(HeadscopeError, match=message):
        nnsight_plan(lm, [edit], IDS.shape, sources={})


@pytest.mark.parametrize("case", sorted(BAD_EDITS))
def test_bridge_checks_edits_against_the_model(bridge_pair, case):
    _, bridge = bridge_pair
    edit, message = BAD_EDITS[case]
    with pytest.raises(HeadscopeError, match=message):
        bridge_hooks(bridge, [edit], sources={})
