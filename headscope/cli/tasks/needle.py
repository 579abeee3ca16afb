"""``--task needle``: retrieval-head scores and needle-in-a-haystack accuracy."""

from __future__ import annotations

import argparse

import numpy as np

from headscope import zoo
from headscope.analyzers.retrieval import DECODE_STEPS, SPANS, VARIANTS, needle_accuracy, retrieval_heads
from headscope.cli.registry import register_task
from headscope.errors import HeadscopeError
from headscope.tasks.needle import NeedleTask, load_haystack, load_needles
from headscope.validate import number_list


@register_task("needle", default_model="retrieval")
def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--lengths", type=number_list(int, positive=True), help="context lengths in tokens, comma-separated")
    parser.add_argument("--depths", type=number_list(float), help="needle depths in percent, comma-separated")
    parser.add_argument("--needles", help="JSONL file of needles: {needle, question, answer} per line")
    parser.add_argument("--haystack", help="text file of filler sentences")
    parser.add_argument("--chat-template", choices=("auto", "on", "off"), default="auto")
    if command == "score":
        add_retrieval_arguments(parser)


def add_retrieval_arguments(parser: argparse.ArgumentParser) -> None:
    """Scoring options of retrieval_heads (shared by the needle and context-conflict tasks)."""
    parser.add_argument("--variant", choices=VARIANTS, default="teacher-forced")
    parser.add_argument("--span", choices=SPANS, default="answer",
                        help="where hits count and what they are divided by: the needle's answer phrase "
                             "(reference) or the whole needle sentence")
    parser.add_argument("--decode-steps", choices=DECODE_STEPS, default="answer",
                        help="decode variant: len(answer) steps, or the reference's rule (up to EOS/newline, "
                             "at most 50 steps, every step counted)")


def retrieval_options(args) -> dict:
    return {"variant": args.variant, "span": args.span, "decode_steps": args.decode_steps,
            "batch_size": args.batch_size, "progress": not args.quiet}


def trials(args, hm):
    """The length x depth x needle grid for this model (an organism carries its own default grid)."""
    grid = zoo.organism_info(args.model).get("needle", {})
    lengths = args.lengths or grid.get("lengths")
    if lengths is None:  # the reference grid, cut at the model's positions
        limit = hm.geometry.max_positions or 50000
        lengths = [int(n) for n in np.linspace(1000, 50000, 20) if n <= limit - 64] or [min(1000, limit - 64)]
    depths = args.depths or grid.get("depths") or list(np.linspace(0, 100, 10))
    if hm.tokenizer is None:
        raise HeadscopeError(f"{args.model} has no tokenizer files; the needle task needs one")
    task = NeedleTask(
        hm.tokenizer,
        needles=args.needles,
        haystack=args.haystack,
        lengths=lengths,
        depths=depths,
        use_chat_template={"auto": "auto", "on": True, "off": False}[args.chat_template],
        max_positions=hm.geometry.max_positions,
    )
    return task.trials()


def check(args) -> None:
    if args.needles:
        load_needles(args.needles)
    if args.haystack:
        load_haystack(args.haystack)


def can_shard(args) -> bool:
    return True  # the needle grid shards over its trial batches


def score(args, hm):
    grid = trials(args, hm)
    return retrieval_heads(hm, grid, **retrieval_options(args), shard=getattr(args, "shard", None))


def evaluate(args, hm) -> dict[str, float]:
    records = needle_accuracy(hm, trials(args, hm), batch_size=args.batch_size, progress=not args.quiet)
    return {"accuracy": float(records["correct"].mean())}
