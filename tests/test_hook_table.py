"""HeadModel's one hook table: every hook the package installs goes through it and leaves with it.

Known truths: torch's own hook dictionaries of each module (``_forward_hooks``,
``_forward_pre_hooks``) are empty before a block and again after it, also after an exception, and a
hook entered through the table is called on the forward pass it watches.
"""

import pytest
import torch

from conftest import tiny_model
from headscope.interventions import Edit, intervene
from headscope.model import HOOK_KINDS, HeadModel
from headscope.zoo.training import head_dropout


@pytest.fixture(scope="module")
def hm():
    return HeadModel(tiny_model("llama"))


def torch_hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hook_module_calls_the_hook_and_removes_it(hm):
    seen = []
    block = hm._layers[1].block
    before = torch_hooks(hm.model)
    with hm.hook_module(block, lambda module, args, output: seen.append(output[0].shape if isinstance(output, tuple)
                                                                          else output.shape)):
        assert len(hm._hooks["module"]) == 1 and hm.hooks_installed()
        hm.model(torch.tensor([[1, 2, 3, 4, 5]]))
    assert seen == [torch.Size([1, 5, 64])]
    assert torch_hooks(hm.model) == before == 0
    assert not hm.hooks_installed() and hm._hooks["module"] == []


def test_hooks_leave_after_an_exception(hm):
    with pytest.raises(RuntimeError, match="boom"):
        with hm.hook_module(hm.model, lambda module, args, kwargs: None, pre=True, with_kwargs=True), \
                hm.capture_z([0]), hm.watch_residual(lambda layer, hidden: None):
            assert torch_hooks(hm.model) > 0
            raise RuntimeError("boom")
    assert torch_hooks(hm.model) == 0 and not hm.hooks_installed()
    assert all(hm._hooks[kind] == [] for kind in HOOK_KINDS)


def test_run_with_cache_hooks_go_through_the_table(hm, monkeypatch):
    """run_with_cache's projection and block hooks are entered with hook_module (counted here)."""
    entered = []
    real = HeadModel.hook_module

    def counting(self, module, hook, **kwargs):
        entered.append(module)
        return real(self, module, hook, **kwargs)

    monkeypatch.setattr(HeadModel, "hook_module", counting)
    _, cache = hm.run_with_cache(torch.tensor([[1, 2, 3, 4]]))
    # per layer: q, k, v projections and the block (resid_post)
    assert len(entered) == hm.geometry.n_layers * 4
    assert cache["blocks.1.hook_resid_post"].shape == (1, 4, 64)
    assert torch_hooks(hm.model) == 0


def test_intervene_mask_pre_hook_is_in_the_table(hm):
    """A position range without attention_mask needs the model pre-hook that reads each call's mask."""
    ids = torch.tensor([[0, 0, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with intervene(hm, Edit("zero", [(0, 1)], positions=(0, 2))):
        assert len(hm._hooks["module"]) == 2  # the mask pre-hook and the finite-logits check
        assert len(hm.model._forward_pre_hooks) == 1
        inferred = hm.model(ids, attention_mask=mask).logits
    with intervene(hm, Edit("zero", [(0, 1)], positions=(0, 2)), attention_mask=mask):
        assert len(hm._hooks["module"]) == 1  # the mask was given: no pre-hook, only the logits check
        assert len(hm.model._forward_pre_hooks) == 0
        given = hm.model(ids, attention_mask=mask).logits
    assert torch.allclose(inferred, given)
    assert torch_hooks(hm.model) == 0


def test_training_head_dropout_equals_a_plain_o_proj_hook():
    """The organism trainers' head dropout (zoo.training.head_dropout, a z-edit of the table) computes,
    with the same seed, what a hand-written o_proj pre-hook computes; in eval mode nothing changes."""
    model = tiny_model("llama").train()
    ids = torch.tensor([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]])
    H, d = model.config.num_attention_heads, model.config.hidden_size // model.config.num_attention_heads

    def reference(module, args):  # the trainers' former hook, on layer 1 only
        x = args[0]
        keep = (torch.rand(x.shape[0], 1, H, 1) >= 0.5).to(x.dtype) / 0.5
        return ((x.view(*x.shape[:-1], H, d) * keep).view_as(x),) + args[1:]

    handle = model.model.layers[1].self_attn.o_proj.register_forward_pre_hook(reference)
    try:
        torch.manual_seed(3)
        want = model(ids).logits
    finally:
        handle.remove()
    with head_dropout(model, [1], 0.5):
        torch.manual_seed(3)
        got = model(ids).logits
        model.eval()
        evaluated = model(ids).logits
    plain = model(ids).logits
    assert torch.equal(evaluated, plain)  # eval mode: no dropout
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(got, plain, atol=1e-3)  # the dropout did drop something
    assert torch_hooks(model) == 0
