"""``headscope score --task NAME``: score every head for a task; print and export the ranking
(``--shard I/N``: one part of a long sweep, joined by ``headscope merge``)."""

from __future__ import annotations

import argparse

from headscope.cli.common import load_model
from headscope.formats import provenance_of_run
from headscope.errors import HeadscopeError
from headscope.heads import format_head
from headscope.provenance import run_fingerprint
from headscope.sharding import Part, Shard, write_part
from headscope.validate import nonnegative_int

NAME = "score"
HELP = "score every head for a task; print and export the ranking"
TASK = True  # takes --task and the options every task has


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", help="write the ranking CSV here (plus a .json metadata sidecar)")
    parser.add_argument("--show", type=nonnegative_int, default=10, help="how many top heads to print")
    parser.add_argument("--shard", metavar="I/N", help="run part I (0-based) of N of a long sweep and write it to "
                        "--out (Ships, generalized Ships, activation / path patching, needle); join with `headscope merge`")


def run(args, task) -> int:
    if task.score is None:
        raise HeadscopeError(f"task {args.task!r} has no head scores; try `headscope eval --task {args.task}`")
    args.shard = Shard.parse(args.shard)
    if args.shard is not None and not args.out:
        raise HeadscopeError("--shard I/N writes its part to --out PATH; give one path per shard")
    if args.shard is not None and not task.can_shard(args):
        raise HeadscopeError(f"--task {args.task}{_method(args)} does not run sharded; --shard applies to Ships, "
                             "generalized Ships, activation / path patching and the needle task: drop --shard")
    hm = load_model(args)
    scores = task.score(args, hm)
    if args.out:  # what the scores were computed with (read by `headscope export`); each shard records the same
        scores.params.setdefault("provenance", provenance_of_run(hm, args))
    if args.shard is not None:
        if not isinstance(scores, Part):
            raise HeadscopeError(f"{scores.method} does not run sharded; --shard applies to Ships, generalized Ships, "
                                 "activation / path patching and the needle task")
        write_part(scores, args.out, fingerprint=run_fingerprint(hm, args))
        print(f"wrote part {args.shard} of {scores.method} to {args.out}; join all parts with `headscope merge`")
        return 0
    frame = scores.to_frame()
    details = ", ".join(f"{k}={v}" for k, v in scores.params.items() if k != "provenance")
    print(f"{hm}\n{scores.method} scores ({details})")
    shown = frame.dropna(subset=["score"]).head(args.show)  # unscored heads (NaN) are not ranked
    shown = shown.assign(head=[format_head(h) for h in zip(shown["layer"], shown["head"])]).drop(columns="layer")
    print(shown.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    if args.out:
        scores.to_csv(args.out)
        print(f"wrote {args.out} ({len(frame)} heads)")
    return 0


def _method(args) -> str:
    return f" --method {args.method}" if getattr(args, "method", None) else ""
