"""Issue 14 at the Python level: one test per reading rule (rankings, sidecars, edits JSON, needles,
state files), result files written whole and together, one HeadModel across threads, left padding
inferred from the model call, no deprecated cache argument."""

import json
import os
import threading

import pytest
import torch

from conftest import tiny_model
from headscope.errors import HeadscopeError
from headscope.model import HeadModel
from headscope.scores import HeadScores, read_ranking
from headscope.io import write_whole
from headscope.validate import read_text

HEADER = "layer,head,score\n"


# ------------------------------------------------------------------------------ ranking rules
@pytest.mark.parametrize("body, fragment", [
    ("", "no rows"),                                  # header only
    ("x,0,1\n", "layer must be an integer"),          # not a number
    ("1.7,0,1\n", "layer must be an integer"),        # 1.7 is an error, not 1
    ("0,2.0,1\n", "head must be an integer"),
    ("-1,0,1\n", "outside the grid"),
    ("0,0,1\n0,0,2\n", "twice"),                      # a head listed twice
    ("0,0,big\n", "score must be a number"),
    ("0,0,inf\n", "infinite"),
    ("0,0,nan\n0,1,\n", "no scored heads"),           # all-NaN ranking
    ("0,0\n", "fields"),
])
def test_ranking_rows_are_validated(tmp_path, body, fragment):
    (tmp_path / "r.csv").write_text(HEADER + body)
    with pytest.raises(HeadscopeError, match=fragment):
        read_ranking(tmp_path / "r.csv")


def test_partial_ranking_never_yields_unscored_heads(tmp_path):
    (tmp_path / "r.csv").write_text(HEADER + "0,0,1\n1,2,3\n")
    scores = HeadScores.from_csv(tmp_path / "r.csv", grid=(2, 4))
    assert scores.top(2) == [(1, 2), (0, 0)]
    with pytest.raises(HeadscopeError, match="scores only 2 heads"):
        scores.top(3)


def test_sidecar_rules(tmp_path):
    path = HeadScores(torch.arange(6.0).view(2, 3), "m", "x").to_csv(tmp_path / "r.csv")
    side = tmp_path / "r.json"
    meta = json.loads(side.read_text())
    assert meta["shape"] == [2, 3] and len(meta["csv_sha256"]) == 64
    with pytest.raises(HeadscopeError, match="this model has 4 layers x 3 heads"):
        HeadScores.from_csv(path, grid=(4, 3))
    for content, fragment in [("{oops", "not valid JSON"), ("[2, 3]", "must be a JSON object"),
                              (json.dumps({**meta, "shape": [2, 0]}), "shape must be"),
                              (json.dumps({**meta, "params": [1]}), "params must be a dict"),
                              (json.dumps({**meta, "shape": [1, 3]}), "outside the 1x3 grid")]:
        side.write_text(content)
        with pytest.raises(HeadscopeError, match=fragment):
            HeadScores.from_csv(path)


def test_a_kill_between_the_two_renames_reads_as_the_old_pair(tmp_path, monkeypatch):
    """The sidecar is written first with the new CSV's hash and the old pair's metadata: new sidecar +
    old CSV reads as the old ranking, never a mix (tests/test_bad_input_shards.py kills a real process)."""
    old = HeadScores(torch.arange(6.0).view(2, 3), "old", "x").to_csv(tmp_path / "r.csv")
    import headscope.scores as scores_module

    writes = []

    def write_then_die(path, text):
        writes.append(path.name)
        if path.suffix == ".csv":
            raise KeyboardInterrupt  # killed after the sidecar's rename, before the CSV's
        return write_whole(path, text)

    monkeypatch.setattr(scores_module, "write_whole", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        HeadScores(-torch.arange(6.0).view(2, 3), "new", "x").to_csv(old)
    assert writes == ["r.json", "r.csv"]
    got = HeadScores.from_csv(old)
    assert got.method == "old" and torch.equal(got.scores, torch.arange(6.0).view(2, 3))


def test_written_files_honour_the_umask_and_leave_no_temp_on_failure(tmp_path):
    previous = os.umask(0o027)
    try:
        write_whole(tmp_path / "a.txt", "x")
    finally:
        os.umask(previous)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640
    with pytest.raises(UnicodeEncodeError):
        write_whole(tmp_path / "b.txt", "bad \udce9")  # fails inside the write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_input_files_are_regular_utf8_and_bounded(tmp_path):
    (tmp_path / "big.txt").write_text("x" * 100)
    with pytest.raises(HeadscopeError, match="too large"):
        read_text(tmp_path / "big.txt", "text file", limit=99)
    assert read_text(tmp_path / "big.txt", "text file", limit=100) == "x" * 100
    with pytest.raises(HeadscopeError, match="not a regular file"):
        read_text("/dev/zero", "text file")


# ------------------------------------------------------------------------------ edits JSON
@pytest.mark.parametrize("content, fragment", [
    ([{"kind": "scale", "heads": [[0, 1]], "strength": float("nan")}], "finite"),
    ([{"kind": "scale", "heads": [[0, 1]], "strength": "2"}], "must be a number"),
    ([{"kind": "scale", "heads": [[0, 1], [1, 1]], "strength": [1.0, float("inf")]}], "finite"),
    ([{"kind": "zero", "heads": [[1.7, 0]]}], "pair of integers"),
    ([{"kind": "zero", "heads": [[0, 1]], "positions": [1.5, 3]}], "positions"),
    ([{"kind": "zero", "heads": [[0, 1]], "colour": "red"}], "no other keys"),
    ([3], "list of edit objects"),
    ("zero", "list of edit objects"),
])
def test_edits_json_is_validated(tmp_path, content, fragment):
    from headscope.interventions import load_edits

    (tmp_path / "e.json").write_text(json.dumps(content))  # json writes NaN / Infinity literally
    with pytest.raises(HeadscopeError, match=fragment):
        load_edits(tmp_path / "e.json")


def test_tensor_strength_must_be_finite():
    from headscope.interventions import Edit

    with pytest.raises(HeadscopeError, match="finite"):
        Edit("scale", [(0, 1)], strength=torch.tensor(float("nan")))


# ------------------------------------------------------------------------------ needles, state files
@pytest.mark.parametrize("row, fragment", [
    ({"needle": "The code is 42.", "question": "code?", "answer": "  "}, "blank"),
    ({"needle": "The code is 42.", "question": "code?", "answer": "17"}, "does not contain its answer"),
    ({"needle": "The code is 42.", "question": "code?", "answer": 42}, "must be text"),
    ({"needle": "The code is 42.", "question": ["code?"], "answer": "42"}, "must be text"),
])
def test_needles_are_validated(tmp_path, row, fragment):
    from headscope.tasks.needle import load_needles

    (tmp_path / "n.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(HeadscopeError, match=fragment):
        load_needles(tmp_path / "n.jsonl")


@pytest.mark.parametrize("state, fragment", [
    ("{oops", "not valid JSON"),
    ("[]", "not a Sahara state"),
    (json.dumps({"settings": {}, "chosen": [[0, "a"]], "scores": [1.0], "first_step": {}}), "malformed"),
    (json.dumps({"settings": {}, "chosen": [[0, 1]], "scores": [float("nan")], "first_step": {}}), "malformed"),
])
def test_state_files_are_validated(tmp_path, state, fragment):
    from headscope.analyzers.safety import _read_state

    (tmp_path / "s.json").write_text(state)
    with pytest.raises(HeadscopeError, match=fragment):
        _read_state(tmp_path / "s.json")


# ------------------------------------------------------------------------------ threads
@pytest.fixture(scope="module")
def hm():
    return HeadModel(tiny_model("llama", seed=3))


def test_two_threads_with_different_edits_on_one_model(hm):
    """Thread A holds an ablation; thread B's plain forwards stay exact and B's own edit is refused
    at once (never mixed); once A is done, B's edit gives B its exact result."""
    from headscope.interventions import Edit, intervene

    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = hm.model(ids).logits
        with hm.ablate([(0, 1), (1, 2)]):
            ablated = hm.model(ids).logits
        with intervene(hm, Edit("scale", [(1, 0)], strength=3.0)):
            scaled = hm.model(ids).logits
    assert (plain - ablated).abs().max() > 1e-3 and (plain - scaled).abs().max() > 1e-3
    a_inside, b_done = threading.Event(), threading.Event()
    results: dict[str, list] = {"a": [], "b": [], "b_error": [], "b_after": []}

    def thread_a():
        with torch.no_grad(), hm.ablate([(0, 1), (1, 2)]):
            a_inside.set()
            while not b_done.is_set():
                results["a"].append(hm.model(ids).logits)

    def thread_b():
        a_inside.wait()
        with torch.no_grad():
            for _ in range(20):
                results["b"].append(hm.model(ids).logits)
            try:
                with intervene(hm, Edit("scale", [(1, 0)], strength=3.0)):
                    results["b"].append(hm.model(ids).logits)
            except HeadscopeError as exc:
                results["b_error"].append(str(exc))
        b_done.set()

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(results["b"]) == 20 and all(torch.equal(x, plain) for x in results["b"])
    assert results["a"] and all(torch.equal(x, ablated) for x in results["a"])
    assert len(results["b_error"]) == 1 and "another thread" in results["b_error"][0]
    assert not hm.hooks_installed()
    with torch.no_grad(), intervene(hm, Edit("scale", [(1, 0)], strength=3.0)):  # free again
        torch.testing.assert_close(hm.model(ids).logits, scaled)


def test_attention_stats_on_two_threads_is_refused_not_nested(hm):
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(1))
    inside, errors = threading.Event(), []
    release = threading.Event()

    def holder():
        with torch.no_grad(), hm.attention_stats(["top1"]):
            hm.model(ids)
            inside.set()
            release.wait(60)

    t = threading.Thread(target=holder)
    t.start()
    inside.wait(60)
    try:
        with hm.attention_stats(["top1"]):
            pass
    except HeadscopeError as exc:
        errors.append(str(exc))
    release.set()
    t.join(60)
    assert len(errors) == 1 and "another thread" in errors[0]


# ------------------------------------------------------------------------------ left padding
def test_left_padded_positions_use_the_model_calls_mask(hm):
    """Positions count from each row's first real token with the mask given to the model only."""
    from headscope.interventions import Edit, intervene

    g = torch.Generator().manual_seed(11)
    a, b = torch.randint(1, 128, (1, 9), generator=g), torch.randint(1, 128, (1, 6), generator=g)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    edits = [Edit("zero", [(0, 1)], positions=(1, 4)), Edit("uniform", [(1, 2)], positions=(2, 5))]
    with torch.no_grad():
        with intervene(hm, edits, attention_mask=mask):
            given = hm.model(batch, attention_mask=mask).logits
        with intervene(hm, edits):
            inferred = hm.model(batch, attention_mask=mask).logits
        with intervene(hm, edits):
            alone = hm.model(b).logits
    torch.testing.assert_close(inferred, given)
    torch.testing.assert_close(inferred[1, 3:], alone[0], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ cache argument
def test_decoding_loops_pass_the_current_cache_argument(hm):
    """DeCoRe and the needle decode variant use ``cache=`` (``past_key_values`` goes in transformers 5.40)."""
    from headscope.analyzers.retrieval import _score_decode
    from headscope.methods.decore import decore_generate
    from headscope.tasks.needle import NeedleTrial

    seen = []
    handle = hm.model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(set(kwargs)), with_kwargs=True)
    try:
        ids = torch.randint(1, 128, (1, 6), generator=torch.Generator().manual_seed(2))
        decore_generate(hm, ids, [(0, 1)], max_new_tokens=3)
    finally:
        handle.remove()
    organism = HeadModel.load("retrieval")  # the decode variant reads the answer as text: needs a tokenizer
    handle = organism.model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(set(kwargs)),
                                                      with_kwargs=True)
    try:
        trial = NeedleTrial(prompt_ids=[3, 9, 4, 7, 5, 2], needle_span=(1, 3), answer_ids=[9, 4], answer="x",
                            length=6, depth=0.0, needle_index=0)
        _score_decode(organism, [trial], [0], 0, "needle")
    finally:
        handle.remove()
    assert len(seen) > 6 and all("past_key_values" not in k for k in seen) and sum("cache" in k for k in seen) >= 2
