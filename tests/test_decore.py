"""DeCoRe decoding against a hand-written reference loop on a tiny random-init Llama."""

import pytest
import torch

from conftest import tiny_model
from headscope.errors import HeadscopeError
from headscope.interventions import Edit, intervene
from headscope.methods.decore import contrast, decore_generate, entropy_alpha, random_heads
from headscope.model import HeadModel

HEADS = [(0, 1), (1, 2), (1, 3)]
N_NEW = 4


@pytest.fixture(scope="module")
def hm():
    return HeadModel(tiny_model("llama", seed=4))


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(1, 128, (2, 8), generator=torch.Generator().manual_seed(9))


def _reference(hm, prompt, alpha=None, mask_prompt=False, cap=None, scale=False, sample_gen=None):
    """No cache: full forwards. The masked model's uniform attention covers rows >= P - 1 (the last
    prompt token on), or every row with mask_prompt."""
    P = prompt.shape[1]
    start = 0 if mask_prompt else P - 1
    seq, alphas = prompt, []
    for _ in range(N_NEW):
        base = hm.model(seq).logits[:, -1]
        with intervene(hm, [Edit("uniform", HEADS, positions=(start, 10**6))]):
            masked = hm.model(seq).logits[:, -1]
        probs = base.softmax(-1)
        a = -(probs * torch.log(probs + 1e-12)).sum(-1) if alpha is None else torch.full((seq.shape[0],), alpha)
        if scale:
            a = a / torch.log(torch.tensor(128.0))
        if cap is not None:
            a = a.clamp(max=cap)
        alphas.append(a)
        score = (1 + a[:, None]) * base.log_softmax(-1) - a[:, None] * masked.log_softmax(-1)
        nxt = torch.multinomial(score.softmax(-1), 1, generator=sample_gen) if sample_gen else score.argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    return seq, torch.stack(alphas, 1)


@torch.no_grad()
@pytest.mark.parametrize("options", [{}, {"alpha": 0.5}, {"mask_prompt": True}, {"cap": 0.3}, {"scale": True}])
def test_decore_equals_reference_loop(hm, prompt, options):
    seq, alphas = _reference(hm, prompt, **options)
    out = decore_generate(hm, prompt, HEADS, max_new_tokens=N_NEW, alpha=options.get("alpha"),
                          mask_prompt_cache=options.get("mask_prompt", False), alpha_cap=options.get("cap"),
                          scale_alpha=options.get("scale", False), eos_token_id=-1)
    assert torch.equal(out.sequences, seq)
    torch.testing.assert_close(out.alphas, alphas, atol=1e-5, rtol=1e-5)
    assert not hm.hooks_installed()


@torch.no_grad()
def test_decore_sampling_equals_reference(hm, prompt):
    seq, _ = _reference(hm, prompt, sample_gen=torch.Generator().manual_seed(3))
    out = decore_generate(hm, prompt, HEADS, max_new_tokens=N_NEW, do_sample=True,
                          generator=torch.Generator().manual_seed(3), eos_token_id=-1)
    assert torch.equal(out.sequences, seq)


@torch.no_grad()
def test_decore_contrast_does_something_and_alpha_zero_is_greedy(hm, prompt):
    greedy = hm.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=N_NEW,
                               do_sample=False, pad_token_id=0)
    out = decore_generate(hm, prompt, HEADS, max_new_tokens=N_NEW, alpha=0.0, eos_token_id=-1)
    assert torch.equal(out.sequences, greedy)
    strong = decore_generate(hm, prompt, HEADS, max_new_tokens=N_NEW, alpha=5.0, eos_token_id=-1)
    base = hm.model(prompt).logits[:, -1].log_softmax(-1)
    assert (strong.scores[:, 0] - base).abs().max() > 1e-2


@torch.no_grad()
def test_decore_left_padding(hm):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(1, 128, (1, 8), generator=g), torch.randint(1, 128, (1, 5), generator=g)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    out = decore_generate(hm, batch, HEADS, max_new_tokens=N_NEW, attention_mask=mask, eos_token_id=-1)
    for row, single in enumerate((a, b)):
        alone = decore_generate(hm, single, HEADS, max_new_tokens=N_NEW, eos_token_id=-1)
        assert torch.equal(out.sequences[row, -N_NEW:], alone.sequences[0, -N_NEW:])
        torch.testing.assert_close(out.alphas[row], alone.alphas[0], atol=1e-4, rtol=1e-4)


def test_hand_formulas():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    assert entropy_alpha(logits).item() == pytest.approx(torch.log(torch.tensor(4.0)).item(), abs=1e-5)
    assert entropy_alpha(logits, scale_alpha=True).item() == pytest.approx(1.0, abs=1e-5)
    assert entropy_alpha(logits, alpha_cap=0.5).item() == pytest.approx(0.5)
    base = torch.log(torch.tensor([[0.3, 0.7]]))
    masked = torch.log(torch.tensor([[0.01, 0.99]]))
    got = contrast(base, masked, 1.0)
    want = 2 * base - masked
    torch.testing.assert_close(got, want)
    assert got.argmax().item() == 0  # the context answer wins once the masked model loses it


def test_random_heads_and_errors(hm, prompt):
    heads = random_heads(hm, 3, exclude=HEADS, seed=1)
    assert len(set(heads)) == 3 and not set(heads) & set(HEADS)
    assert heads == random_heads(hm, 3, exclude=HEADS, seed=1)
    assert random_heads(hm, 5, exclude=HEADS, seed=1) == sorted(set(hm.all_heads()) - set(HEADS))
    with pytest.raises(HeadscopeError, match="random heads"):
        random_heads(hm, 6, exclude=HEADS)
    with pytest.raises(HeadscopeError, match="invalid head"):
        decore_generate(hm, prompt, [(9, 0)])
    with pytest.raises(HeadscopeError, match="max_new_tokens"):
        decore_generate(hm, prompt, HEADS, max_new_tokens=0)
