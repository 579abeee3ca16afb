"""``--task refusal``: the refusal organism's compliance on held-out forbidden prompts and its
accuracy on held-out benign prompts, under the eval flags' ablations.

    headscope eval --task refusal [--ablate safety.csv --top 3]     # last line: compliance: 0.xx
    headscope score --task refusal [--method ships|sahara]          # same as --task safety
"""

from __future__ import annotations

import argparse

from headscope.cli.registry import register_task
from headscope.cli.tasks import safety
from headscope.errors import HeadscopeError
from headscope.tasks import refusal


@register_task("refusal", default_model="refusal")
def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    safety.add_arguments(parser, command)


score, check = safety.score, safety.check


def evaluate(args, hm) -> dict[str, float]:
    try:
        forbidden, benign = refusal.organism_sets(args.model)
    except HeadscopeError:
        raise HeadscopeError(
            f"--task refusal needs an organism with held-out prompts (e.g. --model refusal); {args.model!r} has "
            "none. For your own model and prompts use `headscope eval --task safety --prompts FILE`"
        ) from None
    forbidden = [f.query for f in forbidden][: args.limit] if args.limit else [f.query for f in forbidden]
    m = refusal.refusal_metrics(hm, forbidden, benign, template=args.template, batch_size=args.batch_size)
    return {"benign_accuracy": m["benign_accuracy"], "compliance": m["compliance"]}
