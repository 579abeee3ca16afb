"""Per-input VHR (He et al. 2025; the edit kind "vhr") against its definition: each batch row gets
the heads of its own VHD (the analyzer, checked against a hand computation in test_vision.py),
scaled by alpha at prefill and every decode step; re-selection per step equals the cacheless loop
of vhr_generate."""

import pytest
import torch

from headscope import HeadModel, vision
from headscope.analyzers.vision import select_heads, vision_aware_heads
from headscope.errors import HeadscopeError
from headscope.interventions import Edit, intervene
from headscope.interventions.kinds.vhr import apply
from headscope.methods.vhr import vhr_generate

PROMPTS = ["<image>\ndescribe :", "<image>\nis there a square ?"]


def scenes(n):
    from headscope.tasks import shapes

    return [s.image() for s in shapes.heldout_scenes(n, seed=5)]


@pytest.fixture(scope="module")
def hm():
    torch.set_num_threads(1)
    return HeadModel.load("vision")


def test_per_input_vhr_batch_equals_each_input_with_its_own_vhd_heads(hm):
    images = scenes(2)
    batch = vision.encode(hm, images, PROMPTS)
    assert (batch["attention_mask"] == 0).any(), "the batch must be left-padded"
    kwargs = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True,
                  pad_token_id=vision.pad_id(hm))
    with torch.no_grad(), apply(hm, Edit("vhr", [], strength=2.0)) as run:
        ours = torch.stack(hm.model.generate(**batch, **kwargs).logits)  # [T, B, V]
    assert not hm.hooks_installed()
    assert len(run.selections) == 2 and run.selections[0] != run.selections[1], "inputs choose their own heads"
    for b, (image, prompt) in enumerate(zip(images, PROMPTS)):
        heads = select_heads(vision_aware_heads(hm, [image], [prompt]))
        assert sorted(run.selections[b]) == sorted(heads)
        alone = vision.encode(hm, [image], [prompt])
        with torch.no_grad(), intervene(hm, Edit("scale", heads, strength=2.0)):
            theirs = torch.stack(hm.model.generate(**alone, **kwargs).logits)[:, 0]
        torch.testing.assert_close(ours[:len(theirs), b], theirs, atol=1e-5, rtol=1e-5)  # alone: stops at EOS


def test_per_input_vhr_reselect_equals_the_cacheless_loop(hm):
    image = scenes(3)[2]
    batch = vision.encode(hm, [image], PROMPTS[:1])
    n = batch["input_ids"].shape[1]
    with torch.no_grad(), apply(hm, Edit("vhr", [], options={"reselect": True})) as run:
        out = hm.model.generate(**batch, max_new_tokens=5, do_sample=False, pad_token_id=vision.pad_id(hm))
    tokens, used = vhr_generate(hm, image, PROMPTS[0], reselect=True, max_new_tokens=5)
    got = out[0, n:]
    assert torch.equal(got[:len(tokens)], tokens)
    assert [sorted(h) for h in run.selections[:len(used)]] == [sorted(h) for h in used]


def test_vhr_edit_errors(hm):
    with pytest.raises(HeadscopeError, match="give no heads"):
        Edit("vhr", [(1, 1)])
    with pytest.raises(HeadscopeError, match="unknown VHR option"):
        Edit("vhr", [], options={"top": 3})
    assert Edit.from_dict(Edit("vhr", [], options={"layers": [2, 3]}).to_dict()) == Edit("vhr", [], options={"layers": [2, 3]})
