"""``headscope export``: a ranking in the file formats serving and steering tools read (headscope.formats).

    headscope export ranking.csv --format duo --out patterns/          # full_attention_heads.tsv + config.json
    headscope export ranking.csv --format retrieval-head --out heads.json
    headscope export ranking.csv --format qrhead --out heads.yaml --top 16

Each export also writes OUT.headscope.json with the provenance (model, weights hash, transformers and
headscope versions, task, prompt-set hash, seed) and the query-to-KV rule.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from headscope import formats
from headscope.errors import HeadscopeError
from headscope.interventions.kinds.kv_compress import check_share, check_window
from headscope.model import HeadModel
from headscope.scores import HeadScores, read_ranking
from headscope.validate import positive_int

NAME = "export"
HELP = "write a ranking as a DuoAttention, Retrieval_Head or QRHead file (with provenance)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ranking", help="a ranking CSV written by `headscope score --out`")
    parser.add_argument("--format", dest="fmt", required=True, choices=formats.FORMATS)
    parser.add_argument("--out", dest="export_out", required=True,
                        help="where to write (duo: a folder; the others: a file)")
    parser.add_argument("--model", default=None, help="the ranked model (default: the one its sidecar names)")
    parser.add_argument("--kv-rule", choices=("mean", "max"), default="mean",
                        help="duo: a KV head's score from its query heads' scores")
    parser.add_argument("--full-share", type=float, default=None,
                        help="duo: write 1.0 for this share of KV heads (the full ones) and 0.0 for the rest")
    parser.add_argument("--sink", type=int, default=4, help="duo: sink_size in config.json [4]")
    parser.add_argument("--recent", type=int, default=64, help="duo: recent_size in config.json [64]")
    parser.add_argument("--top", type=positive_int, default=16, help="qrhead: how many top heads to list [16]")
    parser.add_argument("--device", default=None)


def run(args) -> int:
    if args.full_share is not None:
        check_share(args.full_share)
    check_window(args.sink, args.recent)
    out = Path(args.export_out)
    if args.fmt == "duo" and out.exists() and not out.is_dir():  # the paths are checked by headscope.cli.paths
        raise HeadscopeError(f"--out {out} is a file; the duo format writes a folder (full_attention_heads.tsv, config.json)")
    _check_out_name(args.fmt, out)
    if formats.published_format(args.ranking):
        raise HeadscopeError(f"{args.ranking} is already a {formats.published_format(args.ranking)} file; export reads "
                             "a headscope ranking CSV")
    rows, meta = read_ranking(args.ranking)
    _check_options(args, rows)
    model = args.model or meta.get("model")
    if not model:
        raise HeadscopeError(f"{args.ranking} has no sidecar naming its model; pass --model")
    hm = HeadModel.load(model, device=args.device)
    g = hm.geometry
    scores = HeadScores.from_csv(args.ranking, grid=(g.n_layers, g.n_heads))
    recorded = scores.params.get("provenance", {})
    prov = formats.provenance(hm, task=recorded.get("task"), prompt_set_sha256=recorded.get("prompt_set_sha256"),
                              seed=recorded.get("seed"))
    same_kind = str(recorded.get("weights_sha256")).startswith("files:") == str(prov["weights_sha256"]).startswith("files:")
    if same_kind and recorded.get("weights_sha256") not in (None, prov["weights_sha256"]):
        raise HeadscopeError(f"{args.ranking} was scored on other weights (sha256 {recorded['weights_sha256'][:12]}...) "
                             f"than {model} ({prov['weights_sha256'][:12]}...); export it with the model it ranks")
    files = formats.export(scores, args.fmt, out, prov=prov, n_kv_heads=g.n_kv_heads, rule=args.kv_rule,
                           sink=args.sink, recent=args.recent, top=args.top, full_share=args.full_share)
    for path in files:
        print(f"wrote {path}")
    return 0


def _check_out_name(fmt: str, out: Path) -> None:
    """A Retrieval_Head or QRHead file named so that headscope reads it back as that format (formats
    are told by name: a Retrieval_Head JSON written to heads.yaml would be refused on reading)."""
    if fmt == "duo":
        return
    named = formats.published_format(out)
    if named != fmt:
        suffix = ".json" if fmt == "retrieval-head" else ".yaml"
        raise HeadscopeError(f"--out {out}: a {fmt} file is read back by its name; name it *{suffix}, "
                             f"e.g. {out.with_suffix(suffix).name}")


DUO_ONLY = {"kv_rule": "mean", "full_share": None, "sink": 4, "recent": 64}  # dest -> parser default


def _check_options(args, rows) -> None:
    """Options of one format given with another would be ignored: an error naming the format; and
    a qrhead --top beyond the ranking's scored heads (the file would list fewer than asked)."""
    if args.fmt != "duo":
        for dest, default in DUO_ONLY.items():
            if getattr(args, dest) != default:
                raise HeadscopeError(f"--{dest.replace('_', '-')} applies to --format duo only; drop it for "
                                     f"--format {args.fmt}")
    if args.fmt != "qrhead" and args.top != 16:
        raise HeadscopeError(f"--top applies to --format qrhead only; drop it for --format {args.fmt}")
    scored = sum(1 for _, _, score in rows if score == score)  # NaN: unscored
    if args.fmt == "qrhead" and args.top > scored:
        raise HeadscopeError(f"--top {args.top}: {args.ranking} scores only {scored} heads; use --top <= {scored}")
