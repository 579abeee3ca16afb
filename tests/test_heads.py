"""Heads by name: one parser (headscope.heads), accepted by every command that takes heads."""

from pathlib import Path

import pytest

from headscope.cli import main
from headscope.errors import HeadscopeError
from headscope.heads import as_heads, format_heads, parse_heads
from headscope.scores import HeadScores


@pytest.mark.parametrize(
    "text, heads",
    [
        ("L5H1", [(5, 1)]), ("l5h1", [(5, 1)]), ("5.1", [(5, 1)]), ("(5,1)", [(5, 1)]), ("[5, 1]", [(5, 1)]),
        ("L5H1,L6H2", [(5, 1), (6, 2)]), ("5.1 6.2", [(5, 1), (6, 2)]), ("(5,1),(6,2)", [(5, 1), (6, 2)]),
        ("[(5, 1), (6, 2)]", [(5, 1), (6, 2)]), ("L10H12, 3.0;(0,7)", [(10, 12), (3, 0), (0, 7)]),
        ("L1H5 L1H5", [(1, 5)]),
    ],
)
def test_parse_heads_reads_the_fields_spellings(text, heads):
    assert parse_heads(text) == heads
    assert parse_heads(format_heads(heads)) == heads  # the printed form reads back


@pytest.mark.parametrize("text", ["", "5,1", "L5", "H1", "x", "L1H5 foo", "5.1.2", "-1.2"])
def test_parse_heads_rejects_what_is_not_a_head(text):
    with pytest.raises(HeadscopeError, match="L5H1"):
        parse_heads(text)


def test_one_printed_form():
    assert format_heads([(1, 5), (0, 2)]) == "L1H5, L0H2"
    assert format_heads([]) == "none"
    assert "top: L0H1" in repr(HeadScores([[0.0, 1.0]], "demo"))
    assert as_heads(["L1H5", (0, 2)]) == [(1, 5), (0, 2)]
    with pytest.raises(HeadscopeError, match="pair of integers"):
        as_heads([(1.5, 2)])


def test_head_model_takes_names(organism):
    assert organism.check_heads("L1H5, 1.4") == [(1, 5), (1, 4)]
    with pytest.raises(HeadscopeError, match="invalid head.*L9H0"):
        organism.check_heads("L9H0")


def _run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


NEEDLE = ("--task", "needle", "--lengths", "128", "--depths", "50", "--quiet")


def test_eval_ablates_heads_by_name_like_the_ranking(capsys, tmp_path):
    ranking = tmp_path / "r.csv"
    HeadScores([[0.0] * 8, [0, 0, 0, 0, 2, 3, 1, 0], [0.0] * 8, [0.0] * 8], "demo").to_csv(ranking)
    code, by_csv, _ = _run(capsys, "eval", *NEEDLE, "--ablate", str(ranking), "--top", "2")
    assert code == 0 and "L1H5, L1H4" in by_csv
    code, by_name, _ = _run(capsys, "eval", *NEEDLE, "--ablate", "--heads", "L1H5 1.4")
    assert code == 0 and "ablating (zero) heads: L1H5, L1H4" in by_name
    assert by_name.splitlines()[-1] == by_csv.splitlines()[-1]  # same heads, same accuracy
    code, base, _ = _run(capsys, "eval", *NEEDLE)
    assert float(base.split()[-1]) > float(by_name.split()[-1])  # the named heads were really ablated


def test_eval_scale_and_exclude_take_names(capsys):
    code, out, _ = _run(capsys, "eval", *NEEDLE, "--scale", "--heads", "(1,5)", "--alpha", "0")
    assert code == 0 and "scaling by 0 heads: L1H5" in out
    code, out, _ = _run(capsys, "eval", *NEEDLE, "--random", "31", "--exclude", "L1H5", "--draws", "2")
    assert code == 0 and "L1H5" not in out.splitlines()[0]  # 31 of 32 heads: all but the excluded one


@pytest.mark.parametrize(
    "argv, message",
    [
        (("--ablate", "--heads", "L1H5", "--top", "2"), "--heads already names"),
        (("--heads", "L1H5"), "say what to do with them"),
        (("--ablate",), "--ablate needs a ranking CSV"),
        (("--ablate", "--heads", "L1"), "cannot read 'L1'"),
        (("--ablate", "--heads", "L7H0"), "invalid head"),
    ],
)
def test_eval_heads_errors(capsys, argv, message):
    code, _, err = _run(capsys, "eval", *NEEDLE, *argv)
    assert code == 2 and err.startswith("error: ") and message in err


def test_generate_takes_heads_by_name(capsys):
    args = ("generate", "--model", "retrieval", "--prompt", "The secret number", "--max-new-tokens", "2")
    code, out, _ = _run(capsys, *args, "--ablate", "--heads", "L1H5,L1H4")
    assert code == 0 and "ablating (zero, both) L1H5, L1H4" in out
    code, _, err = _run(capsys, *args, "--decore", "--heads", "1.5", "--scale")
    assert code == 2 and "use only one of" in err


def test_circuit_receivers_take_names(capsys):
    pairs = str(Path(__file__).resolve().parent.parent / "datasets" / "circuit_pairs_induction.jsonl")  # the shipped example pairs for the multitask organism
    runs = [_run(capsys, "score", "--task", "circuit", "--model", "multitask", "--pairs", pairs, "--method", "path",
                 "--receivers", spelling, "--quiet") for spelling in ("L1H0", "1.0", "(1,0)")]
    assert all(code == 0 for code, _, _ in runs), [err for _, _, err in runs]
    assert "receivers=[[1, 0]]" in runs[0][1]
    assert runs[0][1] == runs[1][1] == runs[2][1]
    code, _, err = _run(capsys, "score", "--task", "circuit", "--model", "multitask", "--pairs", pairs,
                        "--method", "path", "--receivers", "1-0")
    assert code == 2 and "cannot read '1-0'" in err
