"""Edits during generate(): equal to manual step-by-step loops; scopes; left padding; sampling;
hooks removed after an exception."""

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from conftest import tiny_model
from headscope.interventions import Edit, intervene
from headscope.model import HeadModel

N_NEW = 5


@pytest.fixture(scope="module")
def hm():
    return HeadModel(tiny_model("llama", seed=3))


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(5))


def _generate(hm, ids, edits, **kw):
    with intervene(hm, edits):
        out = hm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N_NEW, do_sample=False,
                                pad_token_id=0, output_scores=True, return_dict_in_generate=True, **kw)
    return out.sequences, torch.stack(out.scores, 1)


def _manual_no_cache(hm, ids, edits):
    """Full re-forward each step: decode rows are the positions >= prompt length."""
    seq, scores = ids, []
    with intervene(hm, edits, prompt_length=ids.shape[1]):
        for _ in range(N_NEW):
            logits = hm.model(seq, use_cache=False).logits[:, -1]
            scores.append(logits)
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    return seq, torch.stack(scores, 1)


def _manual_cache(hm, ids, prefill_edits, decode_edits):
    """Prefill under one set of edits, then decode one token at a time with the KV cache under another."""
    with intervene(hm, prefill_edits):
        out = hm.model(ids, use_cache=True)
    seq, scores, cache = ids, [out.logits[:, -1]], out.cache
    for step in range(N_NEW - 1):
        nxt = scores[-1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
        with intervene(hm, decode_edits):
            out = hm.model(nxt, cache=cache, use_cache=True)
        cache = out.cache
        scores.append(out.logits[:, -1])
    seq = torch.cat([seq, scores[-1].argmax(-1, keepdim=True)], 1)
    return seq, torch.stack(scores, 1)


EDITS = [
    [Edit("zero", [(0, 1), (1, 3)])],
    [Edit("scale", [(1, 0)], strength=-2.0), Edit("uniform", [(0, 2)])],
    [Edit("query_scale", [(1, 1)], strength=1e-4, positions="last")],
]


@pytest.mark.parametrize("edits", EDITS)
def test_generate_equals_manual_loop(hm, prompt, edits):
    seq, scores = _generate(hm, prompt, edits)
    ref_seq, ref_scores = _manual_no_cache(hm, prompt, edits)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(scores, ref_scores, atol=1e-4, rtol=1e-4)
    assert not hm.hooks_installed()


def test_edits_change_generation(hm, prompt):
    _, base = _generate(hm, prompt, [])
    _, edited = _generate(hm, prompt, EDITS[1])
    assert (base - edited).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["zero", "uniform"])
def test_prefill_and_decode_scopes(hm, prompt, kind):
    heads = [(0, 1), (1, 2)]
    everywhere = Edit(kind, heads)
    # prefill-only = edited prefill (its cache too), unedited decode steps
    seq, scores = _generate(hm, prompt, [Edit(kind, heads, scope="prefill")])
    ref_seq, ref_scores = _manual_cache(hm, prompt, [everywhere], [])
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(scores, ref_scores, atol=1e-4, rtol=1e-4)
    # decode-only = unedited prefill and cache, edited decode steps
    seq, scores = _generate(hm, prompt, [Edit(kind, heads, scope="decode")])
    ref_seq, ref_scores = _manual_cache(hm, prompt, [], [everywhere])
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(scores, ref_scores, atol=1e-4, rtol=1e-4)
    # and the two scopes differ from each other and from no edit
    _, none = _generate(hm, prompt, [])
    _, pre = _generate(hm, prompt, [Edit(kind, heads, scope="prefill")])
    assert (pre[:, 0] - none[:, 0]).abs().max() > 1e-4
    assert torch.equal(scores[:, 0], none[:, 0])  # decode-only leaves the first prediction alone


class _Boom(LogitsProcessor):
    def __init__(self):
        self.calls = 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("boom")
        return scores


def test_hooks_removed_after_exception(hm, prompt):
    with pytest.raises(RuntimeError, match="boom"):
        with intervene(hm, [Edit("zero", [(0, 0)]), Edit("uniform", [(1, 1)], scope="decode")]):
            assert hm.hooks_installed()
            hm.model.generate(prompt, max_new_tokens=N_NEW, do_sample=False, pad_token_id=0,
                              logits_processor=LogitsProcessorList([_Boom()]))
    assert not hm.hooks_installed()
    ref = hm.model(prompt).logits
    with intervene(hm, []):
        pass
    torch.testing.assert_close(hm.model(prompt).logits, ref)


def test_left_padded_batch_matches_single_rows(hm):
    """A batch with left padding gives each row what it gets alone; ranges count from the first real token."""
    g = torch.Generator().manual_seed(11)
    a, b = torch.randint(1, 128, (1, 9), generator=g), torch.randint(1, 128, (1, 6), generator=g)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    edits = [Edit("zero", [(0, 1)], positions=(1, 4)), Edit("uniform", [(1, 2)], positions=(2, 5)),
             Edit("scale", [(1, 0)], strength=0.5, scope="decode")]
    with intervene(hm, edits, attention_mask=mask):
        out = hm.model.generate(batch, attention_mask=mask, max_new_tokens=N_NEW, do_sample=False, pad_token_id=0,
                                output_scores=True, return_dict_in_generate=True)
    scores = torch.stack(out.scores, 1)
    for row, single in enumerate((a, b)):
        seq, ref = _generate(hm, single, edits)
        assert torch.equal(out.sequences[row, -N_NEW:], seq[0, -N_NEW:])
        torch.testing.assert_close(scores[row], ref[0], atol=1e-4, rtol=1e-4)


def test_sampling_under_edits_equals_manual_sampling(hm, prompt):
    edits = [Edit("uniform", [(1, 1)], scope="decode"), Edit("scale", [(0, 3)], strength=3.0)]
    torch.manual_seed(0)
    with intervene(hm, edits):
        out = hm.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=N_NEW, do_sample=True,
                                top_k=0, top_p=1.0, temperature=1.0, pad_token_id=0)
    torch.manual_seed(0)
    seq = prompt
    with intervene(hm, edits, prompt_length=prompt.shape[1]):
        for _ in range(N_NEW):
            probs = hm.model(seq, use_cache=False).logits[:, -1].softmax(-1)
            seq = torch.cat([seq, torch.multinomial(probs, 1)], 1)
    assert torch.equal(out, seq)


def test_one_block_serves_several_generate_calls(hm):
    """The prompt length is re-read at each new prefill: two prompts of different lengths in one block
    get what each gets in its own block (decode-only scope)."""
    g = torch.Generator().manual_seed(4)
    p1, p2 = torch.randint(1, 128, (1, 9), generator=g), torch.randint(1, 128, (1, 5), generator=g)
    edits = [Edit("uniform", [(0, 0), (1, 1)], scope="decode")]
    with intervene(hm, edits):
        both = [hm.model.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=N_NEW, do_sample=False,
                                  pad_token_id=0, output_scores=True, return_dict_in_generate=True) for p in (p1, p2)]
    for p, out in zip((p1, p2), both):
        seq, scores = _generate(hm, p, edits)
        assert torch.equal(out.sequences, seq)
        torch.testing.assert_close(torch.stack(out.scores, 1), scores, atol=1e-5, rtol=1e-5)
