"""Edits and probes apply only where they were opened (headscope.scope): a generator's edits not to
its caller's forwards between items, two asyncio tasks' edits not to each other, a thread's not to
another thread, and cached mean / patch reference activations come from the unedited model whatever
is open when they are first needed.

Known truths: the plain model's forward with no hook at all (``torch.equal``), and an eager
reference edit (our own o_proj pre-hooks replacing the heads' z, as in tests/test_edits.py).
"""

import asyncio
import contextlib
import contextvars
import threading

import pytest
import torch

from conftest import tiny_model
from headscope.interventions import Edit, clear_cache, intervene
from headscope.model import HeadModel

H, D = 4, 16  # heads and head_dim of the tiny llama (64 / 4)
ZEROED = [(0, 1), (1, 2)]  # the generator's / task A's ablation
OTHER = [(0, 3), (1, 0)]  # the caller's / task B's ablation


@pytest.fixture(scope="module")
def hm():
    return HeadModel(tiny_model("llama", seed=5))


@pytest.fixture(scope="module")
def batches():
    return [torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(s)) for s in range(3)]


def eager(hm, ids, fn=None):
    """Reference logits: the plain model (no hook at all), or with ``fn(layer, z)`` replacing each
    layer's z [B, S, H, d] through our own o_proj pre-hooks."""
    handles = []
    for layer, block in enumerate(hm.model.model.layers if fn is not None else []):
        def pre(module, args, layer=layer):
            z = args[0].view(*args[0].shape[:-1], H, D)
            return (fn(layer, z.clone()).reshape(args[0].shape),)
        handles.append(block.self_attn.o_proj.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            return hm.model(ids).logits
    finally:
        for handle in handles:
            handle.remove()


def zeroing(*head_lists):
    def fn(layer, z):
        for heads in head_lists:
            for l, h in heads:
                if l == layer:
                    z[:, :, h] = 0
        return z
    return fn


def close(got, want):
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def ablated_items(hm, heads, batches):
    """Yields inside its ablation: the pattern whose edits used to reach the caller's forwards."""
    with torch.no_grad(), hm.ablate(heads):
        for ids in batches:
            yield hm.model(ids).logits


# ------------------------------------------------------------------------------ generators
def test_a_generators_edits_do_not_reach_its_callers_forwards(hm, batches):
    plain = [eager(hm, b) for b in batches]
    want = [eager(hm, b, zeroing(ZEROED)) for b in batches]
    assert all((w - p).abs().max() > 1e-3 for w, p in zip(want, plain))  # the ablation changes the logits
    got, between = [], []
    with torch.no_grad():
        for logits in ablated_items(hm, ZEROED, batches):
            got.append(logits)
            between.append(hm.model(batches[0]).logits)  # the caller's forward while the generator is suspended
    assert len(between) == 3 and all(torch.equal(b, plain[0]) for b in between)
    for g, w in zip(got, want):
        close(g, w)
    assert not hm.hooks_installed()


def test_the_callers_edits_compose_with_a_suspended_generators_and_outlive_it(hm, batches):
    """The caller opens its own ablation while the generator is suspended: the caller's forwards get
    only the caller's edit, the generator's forward inside the caller's block gets both (it runs
    inside that block), and the generator's block closing first leaves the caller's in force."""
    ids = batches[2]
    gen = ablated_items(hm, ZEROED, batches[:2])
    with torch.no_grad():
        first = next(gen)
        with hm.ablate(OTHER):
            mine = hm.model(ids).logits
            second = next(gen)
            assert next(gen, None) is None  # the generator's block closes inside the caller's
            after = hm.model(ids).logits
        plain_after = hm.model(ids).logits
    close(first, eager(hm, batches[0], zeroing(ZEROED)))
    close(mine, eager(hm, ids, zeroing(OTHER)))
    close(second, eager(hm, batches[1], zeroing(ZEROED, OTHER)))
    close(after, eager(hm, ids, zeroing(OTHER)))
    assert torch.equal(plain_after, eager(hm, ids))
    assert not hm.hooks_installed()


def test_edits_opened_by_intervene_in_a_generator_body(hm, batches):
    """intervene's edits (and its mask pre-hook, for a position range) belong to the generator too:
    the caller's forwards, with another padding, neither get the edit nor move its positions."""
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 9])
    edit = Edit("scale", [(1, 1), (0, 2)], strength=2.5, positions=(1, 4))

    def items():
        with torch.no_grad(), intervene(hm, edit):
            for ids in batches[:2]:
                yield hm.model(ids, attention_mask=mask).logits

    with torch.no_grad():
        want = [_logits_with(hm, edit, ids, mask) for ids in batches[:2]]
        got, between = [], []
        for logits in items():
            got.append(logits)
            between.append(hm.model(batches[2]).logits)  # no mask: all rows real
        plain = hm.model(batches[2]).logits
    for g, w in zip(got, want):
        close(g, w)
    assert all(torch.equal(b, plain) for b in between)
    assert not hm.hooks_installed()


def _logits_with(hm, edit, ids, mask):
    with intervene(hm, edit, attention_mask=mask):
        return hm.model(ids, attention_mask=mask).logits


def test_an_abandoned_generator_takes_its_hooks_with_it(hm, batches):
    plain = eager(hm, batches[1])
    gen = ablated_items(hm, ZEROED, batches)
    next(gen)
    assert hm.hooks_installed()
    with torch.no_grad():
        assert torch.equal(hm.model(batches[1]).logits, plain)
    gen.close()
    assert not hm.hooks_installed()


def test_a_contextmanager_body_hands_its_edits_to_the_with_block(hm, batches):
    """contextlib.contextmanager bodies yield inside their blocks too: those blocks belong to the code
    that enters the context manager (and an ExitStack entered in a generator body, to the generator)."""
    ids = batches[1]

    @contextlib.contextmanager
    def my_ablation():
        with hm.ablate(ZEROED):
            yield

    def stacked():
        with contextlib.ExitStack() as stack:
            stack.enter_context(hm.ablate(OTHER))
            yield hm.model(ids).logits

    plain = eager(hm, ids)
    with torch.no_grad():
        with my_ablation():
            mine = hm.model(ids).logits
        gen = stacked()
        from_gen = next(gen)
        between = hm.model(ids).logits
        gen.close()
    close(mine, eager(hm, ids, zeroing(ZEROED)))
    close(from_gen, eager(hm, ids, zeroing(OTHER)))
    assert torch.equal(between, plain)


# ------------------------------------------------------------------------------ asyncio
def test_two_asyncio_tasks_keep_their_own_edits(hm, batches):
    ids = batches[0]

    async def edited(heads):
        with hm.ablate(heads):
            await asyncio.sleep(0)  # the other tasks open theirs meanwhile
            first = hm.model(ids).logits
            await asyncio.sleep(0)
            return first, hm.model(ids).logits

    async def unedited():
        await asyncio.sleep(0)
        return hm.model(ids).logits

    async def main():
        return await asyncio.gather(edited(ZEROED), edited(OTHER), unedited())

    with torch.no_grad():
        (a1, a2), (b1, b2), plain = asyncio.run(main())
    for a in (a1, a2):
        close(a, eager(hm, ids, zeroing(ZEROED)))
    for b in (b1, b2):
        close(b, eager(hm, ids, zeroing(OTHER)))
    assert torch.equal(plain, eager(hm, ids))
    assert not hm.hooks_installed()


def test_a_task_created_inside_a_block_inherits_its_edits(hm, batches):
    """asyncio copies the context when it creates a task: a child task runs its parent's edits."""
    ids = batches[1]

    async def child():
        await asyncio.sleep(0)
        return hm.model(ids).logits

    async def parent():
        with hm.ablate(ZEROED):
            return await asyncio.create_task(child())

    with torch.no_grad():
        got = asyncio.run(parent())
    close(got, eager(hm, ids, zeroing(ZEROED)))


def test_an_async_generators_edits_stay_in_it(hm, batches):
    async def stream():
        with hm.ablate(ZEROED):
            for ids in batches:
                yield hm.model(ids).logits

    async def consume():
        got, between = [], []
        async for logits in stream():
            got.append(logits)
            between.append(hm.model(batches[0]).logits)
        return got, between

    with torch.no_grad():
        got, between = asyncio.run(consume())
    for g, ids in zip(got, batches):
        close(g, eager(hm, ids, zeroing(ZEROED)))
    assert all(torch.equal(b, eager(hm, batches[0])) for b in between)


# ------------------------------------------------------------------------------ threads
@pytest.mark.parametrize("copied", [False, True])
def test_threads_do_not_inherit_edits(hm, batches, copied):
    """A thread started inside a block runs unedited, also when given a copy of the block's context
    (edits belong to one thread at a time); the block's own forwards stay edited."""
    ids, out = batches[2], []

    def run():
        with torch.no_grad():
            out.append(hm.model(ids).logits)

    with torch.no_grad(), hm.ablate(ZEROED):
        target = (lambda: contextvars.copy_context().run(run)) if copied else run
        thread = threading.Thread(target=target)
        thread.start()
        thread.join(120)
        mine = hm.model(ids).logits
    assert torch.equal(out[0], eager(hm, ids))
    close(mine, eager(hm, ids, zeroing(ZEROED)))


# ------------------------------------------------------------------------------ reference activations
def _reference_mean(hm, reference, layer, head):
    """Eager mean of one head's z over the reference rows and positions, on the plain model."""
    seen = {}
    handle = hm.model.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(
        lambda module, args: seen.update(z=args[0].view(*args[0].shape[:-1], H, D)))
    try:
        with torch.no_grad():
            hm.model(reference)
    finally:
        handle.remove()
    return seen["z"][:, :, head].reshape(-1, D).mean(0)


def test_a_mean_first_needed_inside_another_ablation_is_the_unedited_mean(hm, batches):
    clear_cache()
    reference = torch.randint(0, 128, (3, 7), generator=torch.Generator().manual_seed(11))
    ids, outer = batches[0], [(0, 0), (0, 2)]  # layer-0 ablation: changes layer 1's z
    mean = _reference_mean(hm, reference, 1, 2)

    def mean_fn(layer, z):
        if layer == 1:
            z[:, :, 2] = 0.2 * z[:, :, 2] + 0.8 * mean
        return z

    edit = Edit("mean", [(1, 2)], strength=0.8, source=reference)
    with torch.no_grad():
        with hm.ablate(outer), intervene(hm, edit):  # the mean is computed (and cached) here
            inside = hm.model(ids).logits
        with intervene(hm, edit):  # from the cache
            alone = hm.model(ids).logits
    close(inside, eager(hm, ids, lambda layer, z: mean_fn(layer, zeroing(outer)(layer, z))))
    close(alone, eager(hm, ids, mean_fn))
    assert not hm.hooks_installed()


def test_a_patch_source_inside_a_generators_ablation_is_the_unedited_run(hm, batches):
    """The patch source run is suspended from the generator's own (frame-bound) edits too."""
    clear_cache()
    source, ids = batches[1], batches[2]
    seen = {}
    handle = hm.model.model.layers[1].self_attn.o_proj.register_forward_pre_hook(
        lambda module, args: seen.update(z=args[0].view(*args[0].shape[:-1], H, D)))
    try:
        eager(hm, source)
    finally:
        handle.remove()

    def both(layer, z):
        z = zeroing([(0, 1)])(layer, z)
        if layer == 1:
            z[:, :, 3] = seen["z"][:, :, 3]
        return z

    def items():
        with torch.no_grad(), hm.ablate([(0, 1)]), intervene(hm, Edit("patch", [(1, 3)], source=source)):
            yield hm.model(ids).logits

    close(next(iter(items())), eager(hm, ids, both))


def test_an_open_attention_stats_block_does_not_record_the_reference_run(hm, batches):
    clear_cache()
    reference = torch.randint(0, 128, (3, 7), generator=torch.Generator().manual_seed(12))
    edit = Edit("mean", [(1, 2)], source=reference)
    ids = batches[0]
    with torch.no_grad():
        with hm.attention_stats(["top1"]) as rec, intervene(hm, edit):
            hm.model(ids)
        with intervene(hm, edit), hm.attention_stats(["top1"]) as again:  # mean cached: one call
            hm.model(ids)
    assert rec.n_calls == 1 == again.n_calls
    assert torch.equal(rec.top1_index(), again.top1_index())
