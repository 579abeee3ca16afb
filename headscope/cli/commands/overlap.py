"""``headscope overlap A.csv B.csv --top K``: overlap of two circuits (Merullo et al. 2023)."""

from __future__ import annotations

from pathlib import Path

from headscope.analyzers.circuits import circuit, overlap, overlap_figure
from headscope.errors import HeadscopeError
from headscope.heads import format_heads
from headscope.scores import HeadScores
from headscope.io import write_whole
from headscope.validate import positive_int

NAME = "overlap"
HELP = "overlap of two circuits given as ranking CSVs (shared heads, Jaccard, overlap coefficient)"


def add_arguments(parser) -> None:
    parser.add_argument("a", help="ranking CSV of circuit A")
    parser.add_argument("b", help="ranking CSV of circuit B")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--top", type=positive_int, help="circuit = the top K heads of each ranking")
    group.add_argument("--top-p", type=float, help="circuit = the top share of heads (default 0.02)")
    group.add_argument("--threshold", type=float, help="circuit = heads scoring above this")
    parser.add_argument("--signed", action="store_true", help="rank by score, not |score|")
    parser.add_argument("--plot", help="write a plotly HTML figure of the two circuits here")
    parser.add_argument("--force", action="store_true",
                        help="overlap rankings whose sidecars name different models (weights hashes) anyway")


def run(args) -> int:
    a, b = HeadScores.from_csv(args.a), HeadScores.from_csv(args.b)
    if a.scores.shape != b.scores.shape:
        raise HeadscopeError(f"{args.a} is {tuple(a.scores.shape)} and {args.b} is {tuple(b.scores.shape)}: "
                             "rankings of different models cannot be overlapped")
    if not args.force:
        _check_same_model(args.a, a, args.b, b)
    select = dict(top_k=args.top, threshold=args.threshold, top_p=args.top_p if args.top_p is not None else 0.02,
                  absolute=not args.signed)
    ca, cb = circuit(a, **select), circuit(b, **select)
    stats = overlap(ca, cb)
    print(f"A ({args.a}): {format_heads(sorted(ca))}")
    print(f"B ({args.b}): {format_heads(sorted(cb))}")
    print(f"shared: {format_heads(sorted(ca & cb))}")
    for key, value in stats.items():
        print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")
    if args.plot:
        fig = overlap_figure(ca, cb, a.n_layers, a.n_heads, names=(Path(args.a).stem, Path(args.b).stem))
        write_whole(Path(args.plot), fig.to_html(include_plotlyjs="cdn"))
        print(f"wrote {args.plot}")
    return 0


def _check_same_model(path_a, a: HeadScores, path_b, b: HeadScores) -> None:
    """Two rankings whose sidecars name different models: their heads are not the same heads, so the
    overlap would be meaningless (and the shapes may still match). The weights hash decides when both
    record one, else the model names."""
    hash_a, hash_b = (s.params.get("provenance", {}).get("weights_sha256") for s in (a, b))
    if hash_a and hash_b:
        differ, shown = hash_a != hash_b, (f" (weights {hash_a[:12]}...)", f" (weights {hash_b[:12]}...)")
    else:
        differ, shown = bool(a.model and b.model and a.model != b.model), ("", "")
    if differ:
        raise HeadscopeError(f"{path_a} ranks {a.model}{shown[0]} and {path_b} ranks {b.model}{shown[1]}: "
                             "heads of different models do not overlap; use rankings of one model (or --force)")
