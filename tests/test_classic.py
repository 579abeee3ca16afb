"""Classic head types: TransformerLens head_detector semantics, through match-id channels."""

import itertools

import pytest
import torch
from conftest import tiny_model

from headscope.analyzers import classic
from headscope.errors import HeadscopeError
from headscope.model import HeadModel


def eager_pattern(model, tokens):
    impl = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return torch.stack(model(input_ids=tokens, output_attentions=True).attentions)  # [L, B, H, N, N]
    finally:
        model.set_attn_implementation(impl)


def import_head_detector():
    """TL imports HF ``datasets``, which the repo's own ``datasets/`` folder shadows when the repo
    root is on sys.path: import it with the root hidden."""
    import importlib
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    saved_path = list(sys.path)
    ours = sys.modules.get("datasets")
    if ours is not None and os.path.abspath(getattr(ours, "__file__", "") or "").startswith(root):
        del sys.modules["datasets"]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != root]
    try:
        return importlib.import_module("transformer_lens.head_detector")
    except ImportError as exc:
        pytest.skip(f"transformer_lens not importable: {exc}")
    finally:
        sys.path[:] = saved_path


def tl_reference(pattern, tokens, kind, exclude_bos, exclude_current_token):
    """TransformerLens' own detection patterns and "mul" similarity score, per head, mean over sequences."""
    hd = import_head_detector()
    get = {"previous-token": hd.get_previous_token_head_detection_pattern,
           "duplicate-token": hd.get_duplicate_token_head_detection_pattern,
           "induction": hd.get_induction_head_detection_pattern}[kind]
    L, B, H = pattern.shape[:3]
    out = torch.zeros(L, B, H)
    for b in range(B):
        det = get(tokens[b : b + 1])
        for layer, head in itertools.product(range(L), range(H)):
            out[layer, b, head] = hd.compute_head_attention_similarity_score(
                pattern[layer, b, head].clone(), det, exclude_bos=exclude_bos,
                exclude_current_token=exclude_current_token, error_measure="mul")
    return out.mean(1)


def match_mass_from_pattern(pattern, keys, queries):
    """match_mass[l,b,h,i,c] = sum_j A[i,j] [key[c,b,j] == query[c,b,i] >= 0], by hand."""
    eq = (keys.unsqueeze(2) == queries.unsqueeze(3)) & (queries.unsqueeze(3) >= 0)  # [C, B, Nq, Nk]
    return torch.einsum("lbhij,cbij->lbhic", pattern.double(), eq.double()).float()


TOKENS = torch.tensor([[0, 5, 9, 5, 5, 7, 9, 5, 7, 7, 3, 9], [0, 4, 4, 4, 8, 2, 4, 8, 2, 6, 8, 4]])


@pytest.mark.parametrize("kind", classic.KINDS)
@pytest.mark.parametrize("exclude_bos,exclude_current", [(False, False), (True, False), (False, True), (True, True)])
def test_channel_scores_equal_transformer_lens(kind, exclude_bos, exclude_current):
    """The match-channel formula reproduces TL's score exactly (mass from the eager pattern)."""
    model = tiny_model("gpt2")
    pattern = eager_pattern(model, TOKENS)
    keys, queries = classic.match_channels(TOKENS, kind, exclude_bos, exclude_current)
    mine = classic.tl_score(match_mass_from_pattern(pattern, keys, queries), kind, exclude_bos, exclude_current).mean(1)
    ref = tl_reference(pattern, TOKENS, kind, exclude_bos, exclude_current)
    torch.testing.assert_close(mine, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", classic.KINDS)
def test_kernel_scores_equal_eager(kind):
    """End to end through attention_stats(["match_mass"]) (needs the kernel's match_mass)."""
    model = tiny_model("llama")
    hm = HeadModel(model)
    pattern = eager_pattern(model, TOKENS)
    scores = classic.head_type_scores(hm, kind, TOKENS, exclude_bos=True)
    ref = tl_reference(pattern, TOKENS, kind, True, False)
    torch.testing.assert_close(scores.scores, ref, atol=1e-5, rtol=0)
    assert scores.method == kind and not hm.hooks_installed()


def test_hand_built_previous_token_head_scores_one():
    """A head whose attention is exactly the previous token scores 1 (prev) and a known value (induction)."""
    N = 6
    A = torch.zeros(1, 1, 1, N, N)
    A[..., 0, 0] = 1
    for i in range(1, N):
        A[..., i, i - 1] = 1
    tokens = torch.tensor([[0, 1, 2, 1, 2, 3]])
    keys, queries = classic.match_channels(tokens, "previous-token")
    assert classic.tl_score(match_mass_from_pattern(A, keys, queries), "previous-token").item() == pytest.approx(5 / 6)
    # induction: row i attends i-1, counted when tok_{i-2} == tok_i: rows 3 (tok 1 == tok 1) and 4
    keys, queries = classic.match_channels(tokens, "induction")
    assert classic.tl_score(match_mass_from_pattern(A, keys, queries), "induction").item() == pytest.approx(2 / 6)


def test_default_sequences_are_repeated_and_errors():
    hm = HeadModel(tiny_model("llama"))
    seqs = classic.repeated_random_tokens(hm, n_sequences=3, half_length=5)
    assert seqs.shape == (3, 10) and torch.equal(seqs[:, :5], seqs[:, 5:])
    with pytest.raises(HeadscopeError, match="unknown head type"):
        classic.head_type_scores(hm, "copy", seqs)
    with pytest.raises(HeadscopeError, match="N >= 2"):
        classic.head_type_scores(hm, "induction", torch.tensor([[1]]))
    with pytest.raises(HeadscopeError, match="exceed the model's 256 positions"):
        classic.head_type_scores(hm, "induction", torch.ones(1, 300, dtype=torch.long))


def test_cli_classic_task(tmp_path):
    """CLI wiring (scores through the kernel's match_mass)."""
    import transformers as tf

    from headscope.cli import main
    from headscope.scores import HeadScores
    from headscope.zoo.training import build_word_tokenizer

    tok = build_word_tokenizer(["alpha beta gamma delta epsilon zeta eta theta iota kappa"])
    torch.manual_seed(0)
    tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id)).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    out = tmp_path / "ind.csv"
    assert main(["score", "--task", "induction", "--model", str(tmp_path / "m"), "--sequences", "2",
                 "--half-length", "6", "--out", str(out), "--quiet"]) == 0
    assert HeadScores.from_csv(out).method == "induction"


@pytest.mark.slow
def test_retrieval_organism_induction_detector_ranks_retrieval_heads_high():
    """The retrieval organism's best retrieval head (retrieval_heads on its needle grid) is a real
    induction head: in the induction detector's top quarter, with a score of at least 0.2 (a perfect
    induction head scores ~0.49 on these tokens, uniform attention ~0.01). Retrieval heads are a
    subset of induction heads in LLMs (Wu et al. 2024); the organism's trainer makes induction the
    natural solution (issue 5). Measured: the top-3 retrieval heads (1,5), (1,4), (1,6) are the
    top-3 induction heads, 0.471-0.474."""
    from headscope import zoo
    from headscope.analyzers.retrieval import retrieval_heads
    from headscope.tasks.needle import NeedleTask

    hm = HeadModel.load("retrieval")
    grid = zoo.organism_info("retrieval")["needle"]
    task = NeedleTask(hm.tokenizer, lengths=grid["lengths"][:2], depths=grid["depths"], use_chat_template=False)
    truth = retrieval_heads(hm, task.trials(), progress=False)
    induction = classic.head_type_scores(hm, "induction", classic.repeated_random_tokens(hm, 8, 64))
    ranking = [tuple(h) for h in induction.top(induction.scores.numel())]
    best = truth.top(1)[0]
    assert ranking.index(best) < induction.scores.numel() // 4
    assert induction.scores[best] >= 0.2
