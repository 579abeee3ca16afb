"""``--task hallucination``: CHAIR and POPE of an image-text model on held-out shape scenes.

    headscope eval --task hallucination [--model vision] [--scenes 100]
    # last lines: chair_i: X, chair_s: X, pope_acc: X, pope_f1: X

The scenes (``headscope.tasks.shapes``) are generated deterministically: each holds an anchor
shape without the partner it nearly always comes with in the vision organism's training data, so
a co-occurrence prior shows up as hallucinated partners (CHAIR) and "yes" to POPE's adversarial
questions. Any LLaVA-family model can be evaluated on them with its own prompt format
(``--caption-prompt``, ``--question-prompt``).
"""

from __future__ import annotations

import argparse

from headscope import vision, zoo
from headscope.cli.registry import register_task
from headscope.errors import HeadscopeError
from headscope.tasks import shapes
from headscope.tasks.hallucination import check_template
from headscope.validate import positive_int


@register_task("hallucination", default_model="vision")
def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--scenes", type=positive_int, default=None,
                        help="held-out partner-absent scenes (default: the organism's held-out count, else 100)")
    parser.add_argument("--scene-seed", type=int, default=None, help="seed of the held-out scenes (default: the organism's)")
    parser.add_argument("--caption-prompt", default=None,
                        help="caption prompt with an <image> placeholder (default: the organism's)")
    parser.add_argument("--question-prompt", default=None,
                        help="POPE question with <image> and {object} (default: the organism's)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=24, help="caption length limit")


def _prompts(args) -> tuple[str, str]:
    """The caption prompt and POPE question (the organism's unless given), checked for their slots."""
    info = zoo.organism_info(args.model)
    caption = args.caption_prompt or info.get("caption_prompt", shapes.CAPTION_PROMPT)
    question = args.question_prompt or info.get("question_prompt", shapes.QUESTION_PROMPT)
    for name, prompt in (("--caption-prompt", caption), ("--question-prompt", question)):
        if "<image>" not in prompt:
            raise HeadscopeError(f"{name} {prompt!r} has no <image> placeholder; put <image> where the image goes")
    if "{object}" not in question:
        raise HeadscopeError(f"--question-prompt {question!r} has no {{object}} slot, e.g. 'Is there a {{object}} in the image?'")
    check_template(question, "--question-prompt")
    return caption, question


def check(args) -> None:
    _prompts(args)


def evaluate(args, hm) -> dict[str, float]:
    held = zoo.organism_info(args.model).get("heldout", {})
    n = args.scenes if args.scenes is not None else held.get("scenes", 100)
    caption, question = _prompts(args)

    vision.require_vision(hm, "--task hallucination")
    scenes = shapes.heldout_scenes(n, args.scene_seed if args.scene_seed is not None else held.get("seed", 1))
    return shapes.scene_metrics(hm, scenes, caption_prompt=caption, question_template=question,
                                batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
