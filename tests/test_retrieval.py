"""Retrieval heads: hand-computed hits, an eager reference loop, variant agreement, organism truth."""

import json

import pytest
import torch

from headscope import zoo
from headscope.analyzers.retrieval import _hits, needle_accuracy, retrieval_heads
from headscope.errors import HeadscopeError
from headscope.scores import HeadScores
from headscope.tasks.needle import Needle, NeedleTask, load_needles, rouge1_recall


def test_hits_hand_computed():
    # one trial, sequence tokens; needle span [2, 5) holds tokens 7 8 9
    seq = torch.tensor([[1, 2, 7, 8, 9, 3, 7, 8]])
    targets = torch.tensor([[7, 8, 9]])  # tokens produced at three steps
    # top-1 keys for 1 layer x 2 heads x 3 steps
    top1 = torch.tensor([[[[2, 3, 4], [6, 3, 0]]]])
    hits = _hits(top1, seq, [(2, 5)], targets)
    # head 0: keys 2,3,4 hold 7,8,9 = targets, all inside the span -> 3 hits
    # head 1: key 6 holds 7 but lies outside the span; key 3 holds 8 (hit); key 0 outside -> 1 hit
    assert hits[0, 0].sum(-1).tolist() == [3, 1]


def organism_trials(hm, lengths=None, depths=None):
    grid = zoo.organism_info("retrieval")["needle"]
    return NeedleTask(hm.tokenizer, lengths=lengths or grid["lengths"], depths=depths or grid["depths"],
                      use_chat_template=False).trials()


def reference_decode_scores(hm, trial, until_stop=False):
    """The reference's loop, written independently: eager attention, output_attentions per step; a
    hit is the top-1 key inside the needle's answer phrase (real_needle) holding the emitted token,
    worth 1/len(answer phrase). Decodes len(answer) steps, or (until_stop) up to 50 steps stopping
    after <eos> or a newline; the trial counts when the ROUGE-1 recall of the answer phrase in the
    decoded text is > 0.5."""
    model, tok = hm.model, hm.tokenizer
    stops = {tok.eos_token_id, tok("\n", add_special_tokens=False)["input_ids"][-1]}
    impl = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        start, stop = trial.answer_span
        seq = list(trial.prompt_ids)
        with torch.no_grad():
            cache = model(torch.tensor([seq[:-1]]), use_cache=True).cache
            current = seq[-1]
            scores = None
            generated = []
            for _ in range(50 if until_stop else len(trial.answer_ids)):
                out = model(torch.tensor([[current]]), cache=cache, use_cache=True, output_attentions=True)
                cache = out.cache
                token = int(out.logits[0, -1].argmax())
                pattern = torch.stack(out.attentions)[:, 0, :, -1]  # [L, H, keys]
                if scores is None:
                    scores = torch.zeros(pattern.shape[:2])
                for layer in range(pattern.shape[0]):
                    for head in range(pattern.shape[1]):
                        j = int(pattern[layer, head].argmax())
                        if start <= j < stop and seq[j] == token:
                            scores[layer, head] += 1 / (stop - start)
                seq.append(token)
                generated.append(token)
                current = token
                if until_stop and token in stops:
                    break
        response = tok.decode(generated, skip_special_tokens=True)
        real_needle = tok.decode(trial.prompt_ids[start:stop])
        return scores, rouge1_recall(response, real_needle) > 0.5
    finally:
        model.set_attn_implementation(impl)


@pytest.mark.parametrize("steps", ["answer", "until-stop"])
def test_decode_variant_equals_eager_reference_loop(organism, steps):
    trials = organism_trials(organism, lengths=[256], depths=[0, 50, 100])[:6]
    scores = retrieval_heads(organism, trials, variant="decode", decode_steps=steps, progress=False)
    counted = 0
    for trial, mine in zip(trials, scores.per_trial):
        reference, ok = reference_decode_scores(organism, trial, until_stop=steps == "until-stop")
        assert (mine is not None) == ok
        if ok:
            counted += 1
            torch.testing.assert_close(mine, reference, atol=1e-6, rtol=0)
    assert counted >= 4


def test_scores_are_normalised_by_the_answer_span(organism):
    """Hand check of the normalisation: the needle " The secret number of the blue lighthouse is
    4821." has 13 tokens, its answer "4821" 4 (digits). Hits land on the answer's digits either way,
    so per trial the answer-span score is the needle-span score x 13/4; marking a wider answer span
    ("is 4821", 5 tokens) scales it by 4/5."""
    needle = load_needles()[0]
    assert needle.answer == "4821"
    wide = Needle(needle.needle, needle.question, needle.answer, answer_span="is 4821")
    task = NeedleTask(organism.tokenizer, needles=[needle, wide], lengths=[256], depths=[0, 50, 100],
                      use_chat_template=False)
    trials = task.trials()
    for t in trials:
        assert t.needle_span[1] - t.needle_span[0] == 13
        assert t.answer_span[1] - t.answer_span[0] == (4 if t.needle_index == 0 else 5)
    by_answer = retrieval_heads(organism, trials, progress=False)
    by_needle = retrieval_heads(organism, trials, span="needle", progress=False)
    assert by_answer.params["span"] == "answer" and by_needle.params["span"] == "needle"
    counted = [(t, a, n) for t, a, n in zip(trials, by_answer.per_trial, by_needle.per_trial) if a is not None]
    assert len(counted) == len(trials)
    for t, a, n in counted:
        torch.testing.assert_close(a, n * 13 / (4 if t.needle_index == 0 else 5), atol=1e-6, rtol=0)
    narrow, wide_scores = counted[0::2], counted[1::2]  # same prompt, needle 0 then needle 1
    for (_, a, _), (_, b, _) in zip(narrow, wide_scores):
        torch.testing.assert_close(b, a * 4 / 5, atol=1e-6, rtol=0)
    assert by_answer.scores.max() > 0.5 > by_needle.scores.max()


def test_decode_filter_is_text_level_rouge():
    """The issue's digit example: number pieces 5 12 9 6 generated for the answer 8 12 6 5 share three
    of four tokens (token recall 0.75) but are a different number: the trial must not count."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from headscope.analyzers.retrieval import answered
    from headscope.tasks.needle import NeedleTrial, encode_with_span

    vocab = {p: i for i, p in enumerate(["<eos>", "is", ".", "12", *"0123456789"])}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<eos>"))
    raw.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                  pre_tokenizers.Split(Regex(r"12|\d|\."), behavior="isolated")])
    raw.decoder = decoders.Sequence([decoders.WordPiece(prefix="##", cleanup=True), decoders.Fuse(),
                                     decoders.Replace(Regex(r"(?<=\d) (?=\d)"), "")])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>")
    needle_ids, (a, b) = encode_with_span(tok, " is 81265.", "81265")
    trial = NeedleTrial(needle_ids, (0, len(needle_ids)), needle_ids[a:b], "81265", 0, 0.0, 0, answer_span=(a, b))
    wrong = tok("51296", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(trial.answer_ids) == ["8", "12", "6", "5"]
    assert tok.convert_ids_to_tokens(wrong) == ["5", "12", "9", "6"]
    assert len(set(wrong) & set(trial.answer_ids)) == 3  # token-level recall would be 0.75
    assert not answered(tok, wrong, trial)
    assert answered(tok, trial.answer_ids + [vocab["<eos>"]], trial)


def test_teacher_forced_counts_only_exact_answers(organism):
    """Teacher-forced keeps a trial exactly when greedy decoding emits the whole answer (long contexts,
    where the organism errs, give both kinds of trial)."""
    trials = organism_trials(organism, lengths=[640], depths=[0, 100])
    scores = retrieval_heads(organism, trials, batch_size=16, progress=False)
    ids = torch.tensor([t.prompt_ids for t in trials])
    out = organism.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                                  pad_token_id=organism.tokenizer.pad_token_id)[:, ids.shape[1]:]
    exact = [row[: len(t.answer_ids)] == t.answer_ids for row, t in zip(out.tolist(), trials)]
    assert [p is not None for p in scores.per_trial] == exact
    assert 0 < sum(exact) < len(trials)


def test_encoder_and_empty_inputs_are_refused(minilm_path):
    from headscope.model import HeadModel

    with pytest.raises(HeadscopeError, match="encoder"):
        retrieval_heads(HeadModel.load(minilm_path), [None])
    with pytest.raises(HeadscopeError, match="no needle trials"):
        retrieval_heads(HeadModel.load("retrieval"), [])


@pytest.fixture(scope="module")
def organism_scores(organism):
    return retrieval_heads(organism, organism_trials(organism), progress=False)


def test_organism_retrieves(organism):
    records = needle_accuracy(organism, organism_trials(organism), progress=False)
    assert records["correct"].mean() >= 0.9


def test_top_retrieval_heads_are_redundant_copies(organism, organism_scores):
    """The top retrieval heads back each other up, as in LLMs: each alone costs little (ground
    truth), the set together costs far more than the sum of those single drops. Measured: (1,5)
    0.125, (1,4) 0.019, (1,6) 0.006 alone; 0.86 together. (The single-head drops are led by heads
    that never copy: (3,3) 0.41, (0,0) 0.39; single-head drops are not a ranking of retrieval heads.)"""
    import pandas as pd

    table = pd.read_csv(zoo.ground_truth_path("retrieval"))
    drop = {(int(r.layer), int(r.head)): r.drop for r in table.itertuples()}
    top = organism_scores.top(organism.geometry.n_total // 10)
    trials = organism_trials(organism)
    base = needle_accuracy(organism, trials, progress=False)["correct"].mean()
    with organism.ablate(top):
        together = base - needle_accuracy(organism, trials, progress=False)["correct"].mean()
    assert together > 3 * sum(drop[h] for h in top)


def test_ablating_top_retrieval_heads_breaks_retrieval(organism, organism_scores):
    k = organism.geometry.n_total // 10
    trials = organism_trials(organism)
    with organism.ablate(organism_scores.top(k)):
        broken = needle_accuracy(organism, trials, progress=False)["correct"].mean()
    assert broken <= 0.3


@pytest.mark.slow
def test_ablating_random_heads_keeps_retrieval(organism, organism_scores):
    import random

    k = organism.geometry.n_total // 10
    trials = organism_trials(organism)
    pool = [h for h in organism.all_heads() if h not in organism_scores.top(k)]
    rng = random.Random(0)
    accs = []
    for _ in range(5):
        with organism.ablate(rng.sample(pool, k)):
            accs.append(needle_accuracy(organism, trials, progress=False)["correct"].mean())
    assert sum(accs) / len(accs) >= 0.8


def test_ground_truth_file_is_consistent():
    summary = json.loads((zoo.organism_path("retrieval") / "ground_truth.json").read_text())
    assert summary["base_accuracy"] >= 0.9


def trainer_args(**kw):
    import argparse

    base = dict(min_len=48, max_len=544, ramp=0.4, steps=100, batch_tokens=2048, context_weight=1.0,
                answer_weight=20.0, key_weight=5.0, repeat_frac=0.25, repeat_weight=1.0, min_period=4,
                distinct_digits=1, device="cpu", pretrain_steps=10, pretrain_max_len=160, pretrain_batch_tokens=1024)
    return argparse.Namespace(**{**base, **kw})


def test_trainer_induction_rows_repeat_with_their_period():
    """Induction rows: every weighted target equals the token one period earlier (so induction
    predicts it), and the first token of the copy is not weighted."""
    from headscope.zoo import train_retrieval as tr

    maker = tr.BatchMaker(tr.build_tokenizer(), trainer_args(), seed=0)
    ids, weights = maker(0)  # the induction-only phase
    assert ids.shape == weights.shape and ids.shape[0] == 1024 // ids.shape[1]
    for row, w in zip(ids.tolist(), weights.tolist()):
        assert row[0] == maker.bos and all(t in maker.words for t in row[1:])
        first = w.index(1.0)
        period = first - 2  # weights: 0 on <bos>, the first period and the copy's first token
        assert set(w[:first]) == {0.0} and set(w[first:]) == {1.0}
        assert all(row[t] == row[t - period] for t in range(period + 1, len(row)))


def test_trainer_needles_have_distinct_digits_and_skip_the_shipped_ones():
    import random

    from headscope.tasks.needle import load_needles
    from headscope.zoo import train_retrieval as tr

    rng = random.Random(0)
    numbers = [tr.make_needle(rng, distinct_digits=True).answer for _ in range(500)]
    assert all(len(set(n)) == len(n) and 3 <= len(n) <= 5 and n[0] != "0" for n in numbers)
    assert all(len(set(n.answer)) == len(n.answer) for n in load_needles())  # the evaluation needles too
    maker = tr.BatchMaker(tr.build_tokenizer(), trainer_args(repeat_frac=0.5), seed=0)
    ids, weights = maker(10)  # the needle phase: needle prompts and induction rows
    answered = (weights == 20.0).any(1)
    assert 0 < int(answered.sum()) < ids.shape[0]
    shipped = ["".join(n.needle.split()) for n in load_needles()]
    for row in ids[answered].tolist():
        text = "".join(maker.task.tokenizer.decode(row, skip_special_tokens=True).split())
        assert "Thesecretnumberofthe" in text and not any(s in text for s in shipped)
