"""Sharded head sweeps: the parts of ``--shard I/N`` runs merge into exactly (bit for bit) the
ranking one unsharded run gives; bad shard specs and mismatched parts get clear errors."""

import pytest
import torch

from conftest import tiny_model
from headscope import cli
from headscope.analyzers import circuits, retrieval, safety
from headscope.errors import HeadscopeError
from headscope.model import HeadModel
from headscope.scores import HeadScores
from headscope.sharding import Shard, merge, write_part
from headscope.tasks.circuit_pairs import EncodedPairs
from headscope.tasks.needle import NeedleTask


@pytest.fixture(scope="module")
def tiny():
    return HeadModel(tiny_model("llama", seed=3))


def _same(a: HeadScores, b: HeadScores, tmp_path):
    assert a.method == b.method and a.params == b.params
    assert torch.equal(torch.nan_to_num(a.scores, nan=-7.0), torch.nan_to_num(b.scores, nan=-7.0))
    a.to_csv(tmp_path / "a.csv"), b.to_csv(tmp_path / "b.csv")
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()


def _sharded(run, n, tmp_path):
    paths = [write_part(run(Shard(i, n)), tmp_path / f"part{i}") for i in range(n)]
    return merge(paths[::-1])  # order of the part files does not matter


def _groups():
    gen = torch.Generator().manual_seed(2)
    clean = torch.randint(0, 128, (3, 9), generator=gen)
    corrupt = torch.randint(0, 128, (3, 9), generator=gen)
    return [EncodedPairs(clean, corrupt, torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]))]


QUERIES = [[5, 9, 11, 3, 7], [8, 1, 2, 40, 9, 6], [17, 18, 19, 20, 21], [33, 2, 90, 4, 4, 1]]
SWEEPS = {
    "ships": lambda hm, s: safety.ships(hm, QUERIES, top_per_query=3, batch_size=3, progress=False, shard=s),
    "generalized-ships": lambda hm, s: safety.generalized_ships(hm, QUERIES, batch_size=5, progress=False, shard=s),
    "activation": lambda hm, s: circuits.activation_patching(hm, _groups(), heads_per_batch=3, progress=False, shard=s),
    "path": lambda hm, s: circuits.path_patching(hm, _groups(), receivers=[(1, 2)], heads_per_batch=3,
                                                 progress=False, shard=s),
}


@pytest.mark.parametrize("name, n", [(name, 3) for name in sorted(SWEEPS)]
                         + [pytest.param("ships", 8, marks=pytest.mark.slow)])
def test_merged_shards_equal_one_run(tiny, name, n, tmp_path):
    sweep = SWEEPS[name]
    whole = sweep(tiny, None)
    part = sweep(tiny, Shard(1, n))
    assert int(part.scores.isnan().sum()) == 8 - len(Shard(1, n).block(range(8)))  # a part holds only its own heads
    _same(whole, _sharded(lambda s: sweep(tiny, s), n, tmp_path), tmp_path)


def test_needle_grid_sharded_over_trials(organism, tmp_path):
    trials = NeedleTask(organism.tokenizer, lengths=[128], depths=[0, 50, 100], use_chat_template=False).trials()
    whole = retrieval.retrieval_heads(organism, trials, batch_size=2, progress=False)
    merged = _sharded(lambda s: retrieval.retrieval_heads(organism, trials, batch_size=2, progress=False, shard=s),
                      3, tmp_path)
    _same(whole, merged, tmp_path)
    assert [t is None for t in whole.per_trial] == [t is None for t in merged.per_trial]


def test_cli_shards_and_merge(tmp_path, capsys):
    base = ["score", "--task", "needle", "--lengths", "128", "--depths", "0,50,100", "--batch-size", "1", "--quiet"]
    assert cli.main(base + ["--out", str(tmp_path / "whole.csv")]) == 0
    for i in range(2):
        assert cli.main(base + ["--shard", f"{i}/2", "--out", str(tmp_path / f"part.{i}")]) == 0
    assert cli.main(["merge", str(tmp_path / "part.0"), str(tmp_path / "part.1"), "--out", str(tmp_path / "merged.csv")]) == 0
    assert (tmp_path / "whole.csv").read_bytes() == (tmp_path / "merged.csv").read_bytes()
    assert not list(tmp_path.glob(".part*"))  # no temp files left behind
    capsys.readouterr()
    assert cli.main(["merge", str(tmp_path / "part.0")]) == 2
    assert "each of the 2 shards exactly once" in capsys.readouterr().err
    assert cli.main(base + ["--shard", "2/2", "--out", str(tmp_path / "x")]) == 2
    assert "--shard must be I/N" in capsys.readouterr().err
    assert cli.main(base + ["--shard", "0/2"]) == 2
    assert "--out" in capsys.readouterr().err


def test_parts_of_different_runs_do_not_merge(tiny, tmp_path):
    a = write_part(safety.ships(tiny, QUERIES, top_per_query=3, progress=False, shard=Shard(0, 2)), tmp_path / "a")
    b = write_part(safety.ships(tiny, QUERIES, top_per_query=2, progress=False, shard=Shard(1, 2)), tmp_path / "b")
    with pytest.raises(HeadscopeError, match="comes from another run"):
        merge([a, b])
    (tmp_path / "junk").write_text("not a part")
    with pytest.raises(HeadscopeError, match="not a headscope part"):
        merge([tmp_path / "junk"])
