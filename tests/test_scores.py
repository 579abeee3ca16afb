"""HeadScores: ranking, CSV + JSON round trip, comparison, heatmap, bad files."""

import json

import pytest
import torch

from headscope.errors import HeadscopeError
from headscope.scores import HeadScores

SCORES = torch.tensor([[0.1, 0.9, 0.0], [0.5, 0.2, 0.7]])


def test_top_and_frame_order():
    s = HeadScores(SCORES, "retrieval", "m", {"variant": "decode"})
    assert s.top(3) == [(0, 1), (1, 2), (1, 0)]
    assert s.above(0.4) == [(0, 1), (1, 2), (1, 0)]
    frame = s.to_frame()
    assert list(frame.columns) == ["layer", "head", "score", "rank"]
    assert frame["score"].is_monotonic_decreasing and list(frame["rank"]) == [1, 2, 3, 4, 5, 6]


def test_csv_round_trip_with_sidecar(tmp_path):
    s = HeadScores(SCORES, "retrieval", "organism", {"variant": "decode", "trials": 4})
    path = s.to_csv(tmp_path / "ranking.csv")
    lines = path.read_text().splitlines()
    assert lines[0] == "layer,head,score,rank" and len(lines) == 1 + 6
    assert json.loads((tmp_path / "ranking.json").read_text())["params"] == {"variant": "decode", "trials": 4}
    back = HeadScores.from_csv(path)
    torch.testing.assert_close(back.scores, SCORES)
    assert (back.method, back.model, back.params["trials"]) == ("retrieval", "organism", 4)
    assert not list(tmp_path.glob(".*.tmp"))  # written whole, no temp files left


def test_csv_without_sidecar_and_malformed_files(tmp_path):
    (tmp_path / "a.csv").write_text("layer,head,score\n0,0,1.0\n1,1,0.5\n")
    with pytest.raises(HeadscopeError, match="no sidecar"):  # the grid is never guessed
        HeadScores.from_csv(tmp_path / "a.csv")
    back = HeadScores.from_csv(tmp_path / "a.csv", grid=(2, 3))
    assert back.top(2) == [(0, 0), (1, 1)] and back.scores.shape == (2, 3)
    (tmp_path / "b.csv").write_text("l,h,s\n0,0,1\n")
    with pytest.raises(HeadscopeError, match="lacks column"):
        HeadScores.from_csv(tmp_path / "b.csv")
    with pytest.raises(HeadscopeError, match="does not exist"):
        HeadScores.from_csv(tmp_path / "missing.csv")


def test_compare_hand_computed():
    a = HeadScores(SCORES, "a")
    b = HeadScores(torch.tensor([[0.9, 0.8, 0.0], [0.1, 0.2, 0.7]]), "b")
    # top-2: a = {(0,1), (1,2)}, b = {(0,0), (0,1)} -> overlap 1 of 2, jaccard 1/3
    out = a.compare(b, k=2)
    assert out["topk_overlap"] == 0.5 and out["jaccard"] == pytest.approx(1 / 3)
    # ascending ranks of the flattened scores; rho = 1 - 6 sum d^2 / (n (n^2 - 1))
    ra = [2, 6, 1, 4, 3, 5]
    rb = [6, 5, 1, 2, 3, 4]
    d2 = sum((x - y) ** 2 for x, y in zip(ra, rb))  # 22
    expected = 1 - 6 * d2 / (6 * 35)
    assert out["spearman"] == pytest.approx(expected)
    with pytest.raises(HeadscopeError, match="shapes"):
        a.compare(HeadScores(torch.zeros(3, 3), "c"))


def test_heatmap_is_layer_by_head():
    fig = HeadScores(SCORES, "retrieval").heatmap()
    assert fig.data[0].z.shape == (2, 3)
    assert fig.layout.xaxis.title.text == "head"
