"""Head-wise KV compression against a masked-attention reference (eager, whole sequence, no cache)."""

import random

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
from headscope.errors import HeadscopeError
from headscope.interventions.kinds import kv_compress as kvc
from headscope.model import HeadModel


def ranks_of(mask2d):
    r = mask2d.long().cumsum(-1) - 1
    return torch.where(mask2d.bool(), r, -1)


def masked_reference(hm, ids, mask2d, allowed_fn):
    """Logits of a cache-free forward where head h of layer l at query i sees key j iff
    allowed_fn(layer, kv_head, ranks_q [B, N, 1], ranks_k [B, 1, N]) (plus causality and padding)."""
    ranks = ranks_of(mask2d)
    pos = (mask2d.long().cumsum(-1) - 1).masked_fill(mask2d == 0, 0)
    n = ids.shape[1]
    g = hm.geometry
    group = g.n_heads // g.n_kv_heads

    def edit(layer, module, q, k, v, mask, scaling, **kw):
        k = k.repeat_interleave(group, 1)
        v = v.repeat_interleave(group, 1)
        scores = (q.double() @ k.double().transpose(-1, -2)) * scaling  # [B, H, N, N]
        rq, rk = ranks[:, :, None], ranks[:, None, :]
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        out = []
        for h in range(g.n_heads):
            ok = causal & (rk >= 0) & allowed_fn(layer, h // group, rq, rk)
            ok = ok | (rq < 0)  # padding queries: anything (never compared)
            s = scores[:, h].masked_fill(~ok, float("-inf"))
            out.append(s.softmax(-1) @ v[:, h].double())
        return torch.stack(out, 1).to(q.dtype).transpose(1, 2)

    with torch.no_grad(), hm.edit_attention(edit):
        return hm.model(ids, attention_mask=mask2d, position_ids=pos, use_cache=False).logits


def duo_rule(full, sink, recent):
    def allowed(layer, kv, rq, rk):
        if full[layer, kv]:
            return torch.ones_like(rq - rk, dtype=torch.bool)
        return (rk < sink) | (rq - rk < recent)
    return allowed


def left_padded(vocab, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), n), generator=g)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for b, length in enumerate(lengths):
        mask[b, n - length:] = 1
        ids[b, : n - length] = 0
    return ids, mask


def generate_and_reference(hm, ids, mask, ctx, allowed, new=6):
    with torch.no_grad(), ctx as state:
        out = hm.model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0,
                                output_logits=True, return_dict_in_generate=True)
    seq = out.sequences
    full_mask = torch.cat([mask, torch.ones(mask.shape[0], seq.shape[1] - mask.shape[1], dtype=mask.dtype)], 1)
    ref = masked_reference(hm, seq, full_mask, allowed)
    p = ids.shape[1]
    got = torch.stack(out.logits, 1)  # [B, new, V]
    want = ref[:, p - 1: p - 1 + new]
    return got, want, state


@pytest.fixture(scope="module")
def llama():
    return HeadModel(tiny_model("llama"))


@pytest.mark.parametrize("full_rows", [[[True, False], [False, True]], [[False, False], [False, False]],
                                       [[True, True], [True, True]]])
def test_duo_generate_matches_masked_reference_llama(llama, full_rows):
    full = torch.tensor(full_rows)
    ids, mask = left_padded(128, [40, 29])
    sink, recent = 3, 8
    got, want, state = generate_and_reference(llama, ids, mask, kvc.compress(llama, full, sink=sink, recent=recent),
                                              duo_rule(full, sink, recent))
    assert (got - want).abs().max().item() < 1e-5
    if not full.all():  # the masks matter: full attention on these tokens gives other logits
        plain = masked_reference(llama, ids, mask, lambda *a: torch.ones(1, dtype=torch.bool))[:, -1]
        assert (plain - want[:, 0]).abs().max().item() > 1e-3
    cache = state.cache
    # the streaming heads really hold sink + recent slots, the full ones every token
    layer0 = cache.layers[0]
    n_stream = int((~full[0]).sum())
    if n_stream:
        assert layer0.ring_keys.shape == (2, n_stream, recent, layer0.head_dim)
        assert layer0.sink_keys.shape == (2, n_stream, sink, layer0.head_dim)
    assert layer0.keys.shape[-2] == (layer0.seen if full[0].any() else 0) and layer0.seen == 40 + 6 - 1


def test_duo_prefill_logits_all_positions(llama):
    """Every prompt position (not only the last): the streaming prefill is blockwise."""
    full = torch.tensor([[False, True], [False, False]])
    ids, mask = left_padded(128, [70, 55], seed=1)
    sink, recent = 2, 5
    old = kvc.BLOCK
    kvc.BLOCK = 16  # several query blocks in this short prompt
    try:
        with torch.no_grad(), kvc.compress(llama, full, sink=sink, recent=recent):
            got = llama.model(ids, attention_mask=mask).logits
    finally:
        kvc.BLOCK = old
    want = masked_reference(llama, ids, mask, duo_rule(full, sink, recent))
    real = mask.bool()
    assert (got[real] - want[real]).abs().max().item() < 1e-5


def test_duo_on_the_retrieval_organism(organism):
    from headscope.tasks.needle import NeedleTask

    trial = NeedleTask(organism.tokenizer, lengths=[200], depths=[50.0], use_chat_template=False).trials()[0]
    prompt = torch.tensor(trial.prompt_ids)
    ids = torch.full((2, len(prompt)), 2)
    mask = torch.zeros(2, len(prompt), dtype=torch.long)
    ids[0], mask[0] = prompt, 1
    ids[1, 30:], mask[1, 30:] = prompt[30:], 1
    full = torch.tensor([[False, False], [True, False], [False, True], [True, False]])
    got, want, _ = generate_and_reference(organism, ids, mask, kvc.compress(organism, full, sink=4, recent=16),
                                          duo_rule(full, 4, 16), new=5)
    assert (got - want).abs().max().item() < 1e-5


def test_duo_composes_with_ablation(llama):
    from headscope.interventions import Edit, intervene

    full = torch.tensor([[True, False], [False, False]])
    ids, mask = left_padded(128, [30, 24], seed=2)
    with torch.no_grad(), intervene(llama, [Edit("zero", [(1, 2)])]):
        got, want, _ = generate_and_reference(llama, ids, mask, kvc.compress(llama, full, sink=2, recent=6),
                                              duo_rule(full, 2, 6), new=4)
    assert (got - want).abs().max().item() < 1e-5
    with torch.no_grad(), kvc.compress(llama, full, sink=2, recent=6):
        plain = llama.model(ids, attention_mask=mask).logits[:, -1]
    assert (plain - want[:, 0]).abs().max().item() > 1e-3  # the ablation did change the output
    assert not llama.hooks_installed()


def test_another_attention_replacing_edit_is_refused_not_silently_dropped(llama):
    """Only one edit can produce a layer's attention: with kv_compress, a second (VAR's kind) is an error."""
    full = torch.tensor([[True, False], [False, False]])
    ids = torch.randint(3, 128, (1, 20))
    with torch.no_grad(), kvc.compress(llama, full, sink=2, recent=6), \
            llama.edit_attention(lambda *args, **kwargs: None):
        with pytest.raises(HeadscopeError, match="replaces attention"):
            llama.model(ids)
    assert not llama.hooks_installed()


def test_memory_is_bounded(llama):
    full = torch.tensor([[True, False], [False, False]])
    ids = torch.randint(3, 128, (1, 200))
    with torch.no_grad(), kvc.compress(llama, full, sink=4, recent=16) as state:
        llama.model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    cache = state.cache
    d, seen = cache.layers[0].head_dim, 202
    kv_bytes = 4 * 2 * d * (1 * seen + 3 * (4 + 16))  # one full KV head, three streaming ones, float32
    rank_bytes = 8 * 2 * (4 + 16)  # int64 ranks of the sink + ring slots, once per layer (shared by its heads)
    assert cache.nbytes() == kv_bytes + rank_bytes
    assert cache.full_nbytes() == 4 * 2 * d * 4 * seen


def test_choosing_full_kv_heads():
    scores = torch.tensor([[0.9, 0.0, 0.1, 0.2], [0.6, 0.5, 0.0, 0.8]])  # 2 layers, 4 q heads, 2 KV heads
    # group means 0.45 0.15 | 0.55 0.40; group maxima 0.9 0.2 | 0.6 0.8
    assert kvc.full_heads_from_scores(scores, 2, 0.5, "any").tolist() == [[True, False], [False, True]]
    assert kvc.full_heads_from_scores(scores, 2, 0.25, "mean").tolist() == [[False, False], [True, False]]
    assert kvc.full_heads_from_scores(scores, 2, 0.25, "max").tolist() == [[True, False], [False, False]]
    assert kvc.full_heads_from_scores(scores, 2, 0.0).sum() == 0
    like = torch.tensor([[True, False, False], [True, True, False]])
    drawn = kvc.random_full_heads(like, random.Random(0))
    assert drawn.sum(1).tolist() == [1, 2]


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_bad_share(bad):
    with pytest.raises(HeadscopeError, match="full-share"):
        kvc.check_share(bad)


def test_bad_window():
    with pytest.raises(HeadscopeError, match=">= 0"):
        kvc.check_window(-1, 4)
    with pytest.raises(HeadscopeError, match="longer"):
        kvc.check_window(4, 64, context=50)


# ------------------------------------------------------------------------------- headkv
def headkv_rule(hm, ids, mask, budgets, window=8, kernel=7):
    """The reference's own SnapKV selection, from eager attention weights of the prompt."""
    g = hm.geometry
    group = g.n_heads // g.n_kv_heads
    p = ids.shape[1]
    ranks = ranks_of(mask)
    keep = {}

    def tap(layer, module, q, k, v, m, scaling, **kw):
        k = k.repeat_interleave(group, 1)
        s = (q[:, :, -window:].double() @ k.double().transpose(-1, -2)) * scaling
        ok = torch.ones(window, p, dtype=torch.bool).tril(p - window)[None, None] & (ranks[:, None, None, :] >= 0)
        probs = s.masked_fill(~ok, float("-inf")).softmax(-1).nan_to_num(0)
        votes = probs[..., : p - window].sum(-2).view(ids.shape[0], g.n_kv_heads, group, -1).mean(2)
        votes = F.max_pool1d(votes.float(), kernel, stride=1, padding=kernel // 2)
        votes = votes.masked_fill(ranks[:, None, : p - window] < 0, float("-inf"))
        for h in range(g.n_kv_heads):
            kk = min(int(budgets[layer, h]) - window, p - window)
            sel = torch.zeros(ids.shape[0], p, dtype=torch.bool)
            sel[:, p - window:] = True
            top = votes[:, h].topk(kk, -1)
            for b in range(ids.shape[0]):
                sel[b, top.indices[b][top.values[b].isfinite()]] = True
            keep[layer, h] = sel
        return None

    with torch.no_grad(), hm.edit_attention(tap):
        hm.model(ids, attention_mask=mask)

    def allowed(layer, kv, rq, rk):
        # prompt queries: everything causal; generated queries: the kept prompt tokens and all generated ones
        n = rq.shape[1]
        key_pos = torch.arange(n)[None, None, :]
        query_pos = torch.arange(n)[None, :, None]
        kept = torch.zeros(rq.shape[0], 1, n, dtype=torch.bool)
        kept[:, 0, :p] = keep[layer, kv]
        return (query_pos < p) | kept | (key_pos >= p)

    return allowed


def test_headkv_generate_matches_masked_reference(llama):
    ids, mask = left_padded(128, [60, 41], seed=3)
    budgets = kvc.headkv_budgets(torch.tensor([[0.5, 0.1], [0.0, 0.4]]), budget=20, floor=10)
    assert budgets.sum() == 80 and budgets.min() >= 10
    allowed = headkv_rule(llama, ids, mask, budgets)
    got, want, state = generate_and_reference(llama, ids, mask, kvc.compress(llama, policy="headkv", budgets=budgets),
                                              allowed, new=5)
    assert (got - want).abs().max().item() < 1e-5
    held = state.cache.held()
    assert [h["tokens"] for h in held[0].values()] == [int(b) + 4 for b in budgets[0]]


def test_edit_kind_and_headmodel_api_agree(llama):
    """The same compression through intervene(Edit) and through kvc.compress; hooks removed
    afterwards, also after an error inside the block."""
    from headscope.interventions import Edit, intervene, load_edits, save_edits

    full = torch.tensor([[False, True], [True, False]])
    ids, mask = left_padded(128, [33, 20], seed=4)
    edit = kvc.kv_edit(full, sink=2, recent=7)
    assert Edit.from_dict(edit.to_dict()) == edit
    with torch.no_grad(), intervene(llama, [edit]):
        a = llama.model(ids, attention_mask=mask).logits
    with torch.no_grad(), kvc.compress(llama, full, sink=2, recent=7) as state:
        b = llama.model(ids, attention_mask=mask).logits
    assert torch.equal(a, b) and state.longest["tokens"] == 33
    want = masked_reference(llama, ids, mask, duo_rule(full, 2, 7))
    assert (a[mask.bool()] - want[mask.bool()]).abs().max().item() < 1e-5
    with pytest.raises(RuntimeError), kvc.compress(llama, full, sink=2, recent=7):
        raise RuntimeError("inside")
    assert not llama.hooks_installed() and not llama.model._forward_pre_hooks and not llama.model._forward_hooks
    with pytest.raises(HeadscopeError, match="needs options"):
        Edit("kv_compress", [], options={"policy": "duo"})
    with pytest.raises(HeadscopeError, match="must be >= 0"):
        kvc.kv_edit(full, sink=-1)


def test_attention_statistics_refused_on_a_compressed_cache(llama):
    full = torch.tensor([[True, False], [False, False]])
    ids = torch.randint(3, 128, (1, 20))
    with pytest.raises(HeadscopeError, match="cannot run on a compressed"):
        with kvc.compress(llama, full, sink=2, recent=4), llama.attention_stats(["top1"]):
            llama.model(ids)
    assert not llama.hooks_installed()
