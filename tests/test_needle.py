"""The needle task builder: exact spans, lengths, depths at sentence starts, clear errors."""

import json

import pytest

from headscope.errors import HeadscopeError
from headscope.tasks.needle import Needle, NeedleTask, is_correct, load_haystack, load_needles, rouge1_recall
from headscope.zoo.training import build_word_tokenizer

NEEDLE = Needle("The secret number of the red bridge is 8165.", "What is the secret number of the red bridge?", "8165")


@pytest.fixture(scope="module")
def tokenizer():
    from headscope.tasks.needle import DEFAULT_TEMPLATE

    return build_word_tokenizer(load_haystack() + [NEEDLE.needle, NEEDLE.question, DEFAULT_TEMPLATE])


@pytest.mark.parametrize("depth", [0, 33, 50, 100])
def test_trial_layout(tokenizer, depth):
    task = NeedleTask(tokenizer, needles=[NEEDLE], lengths=[200], depths=[depth])
    trial = task.build(NEEDLE, 200, depth)
    assert len(trial.prompt_ids) == 200  # length counts the whole prompt
    start, stop = trial.needle_span
    assert trial.prompt_ids[start:stop] == tokenizer(" " + NEEDLE.needle, add_special_tokens=False)["input_ids"]
    assert trial.prompt_ids[0] == tokenizer.bos_token_id
    text = tokenizer.decode(trial.prompt_ids, skip_special_tokens=True)
    assert text.replace(" ", "").endswith("Question:Whatisthesecretnumberoftheredbridge?\nAnswer:")
    before = tokenizer.decode(trial.prompt_ids[1:start])
    assert before == "" or before.endswith(".")  # the needle starts a sentence
    assert is_correct(tokenizer.decode(trial.answer_ids), "8165")
    # the answer span: " The secret number of the red bridge is | 8 1 6 5 | ." -> needle tokens 8..12
    assert trial.answer_span == (start + 8, start + 12) and trial.prompt_ids[start + 8 : start + 12] == trial.answer_ids


def test_depth_moves_the_needle_back(tokenizer):
    task = NeedleTask(tokenizer, needles=[NEEDLE], lengths=[300], depths=[0, 50, 100])
    starts = [t.needle_span[0] for t in task.trials()]
    assert starts[0] == 1 and starts[0] < starts[1] < starts[2]


def test_grid_size_and_wordpiece_tokenizer(minilm_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path)
    task = NeedleTask(tok, needles=[NEEDLE, NEEDLE], lengths=[120, 160], depths=[0, 50, 100], use_chat_template=False)
    trials = task.trials()
    assert len(trials) == 2 * 3 * 2 and {len(t.prompt_ids) for t in trials} == {120, 160}
    t = trials[3]
    assert "8165" in tok.decode(t.prompt_ids[t.needle_span[0] : t.needle_span[1]]).replace(" ", "")


def test_errors(tokenizer, tmp_path):
    with pytest.raises(HeadscopeError, match="too short for the needle"):
        NeedleTask(tokenizer, needles=[NEEDLE]).build(NEEDLE, 20, 50)
    with pytest.raises(HeadscopeError, match="exceeds the model's 256 positions"):
        NeedleTask(tokenizer, needles=[NEEDLE], max_positions=256).build(NEEDLE, 300, 50)
    with pytest.raises(HeadscopeError, match=r"depths must lie in \[0, 100\]"):
        NeedleTask(tokenizer, needles=[NEEDLE], depths=[150])
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(HeadscopeError, match="holds no needles"):
        load_needles(tmp_path / "empty.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"needle": "x", "question": "y"}\n')
    with pytest.raises(HeadscopeError, match=r"bad.jsonl:1 lacks .*answer"):
        load_needles(tmp_path / "bad.jsonl")
    (tmp_path / "absent.jsonl").write_text('{"needle": "A is one.", "question": "A?", "answer": "1"}\n')
    with pytest.raises(HeadscopeError, match=r"absent.jsonl:1: .*does not contain its answer '1'.*answer_span"):
        load_needles(tmp_path / "absent.jsonl")
    with pytest.raises(HeadscopeError, match="does not contain its answer_span 'two'"):
        Needle("A is one.", "A?", "1", answer_span="two")
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(HeadscopeError, match="broken.jsonl:1 is not valid JSON"):
        load_needles(tmp_path / "broken.jsonl")


def test_user_files(tmp_path):
    rows = [{"needle": "A is 1.", "question": "A?", "answer": "1"},
            {"needle": "B is one.", "question": "B?", "answer": "1", "answer_span": "one"}]
    (tmp_path / "n.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "h.txt").write_text("One sentence here. Another one there!\nA third?")
    assert load_needles(tmp_path / "n.jsonl") == [Needle("A is 1.", "A?", "1"), Needle("B is one.", "B?", "1", "one")]
    assert load_haystack(tmp_path / "h.txt") == ["One sentence here.", "Another one there!", "A third?"]


def test_answer_span_marked_in_the_needle(tokenizer):
    """A needle whose scored span is a marked sub-span that is not literally the answer."""
    needle = Needle(NEEDLE.needle, NEEDLE.question, "8165", answer_span="bridge is 8165")
    trial = NeedleTask(tokenizer, needles=[needle], lengths=[200], depths=[50]).trials()[0]
    start, _ = trial.needle_span
    assert trial.answer_span == (start + 6, start + 12)  # "bridge is 8 1 6 5"
    assert tokenizer.decode(trial.prompt_ids[slice(*trial.answer_span)]) == "bridge is 8 1 6 5"


def test_answer_metrics():
    assert is_correct(" 8 1 6 5 <eos>", "8165") and not is_correct("8 1 6", "8165")
    assert rouge1_recall("8165", "8165") == 1.0
    assert rouge1_recall("The number is 8165.", "is 8165") == 1.0  # word level, case and punctuation ignored
    assert rouge1_recall("red red red", "red bridge red blue") == 0.5  # clipped counts
    # the digit example: pieces 5 12 9 6 against 8 12 6 5 share 3 of 4 tokens, but as text the
    # numbers are different words, so the trial does not count
    assert rouge1_recall("51296", "81265") == 0.0
