"""``--task icl``: accuracy on in-context-learning task files (JSONL of input/output pairs), 0-shot,
k-shot (``--shots``) or 0-shot with task embeddings injected (``--inject``, Park & Rhee 2025).

    headscope eval --task icl --model icl --tasks next.jsonl                    # 0-shot
    headscope eval --task icl --model icl --tasks next.jsonl --shots 10         # 10-shot ICL
    headscope eval --task icl --model icl --tasks next.jsonl --inject next.safetensors

The last line is the accuracy averaged over the task files (first-token exact match on the test split).
``--inject`` (like every edit flag, headscope.cli.tasks.edit_flags) applies around the whole evaluation.
"""

from __future__ import annotations

import argparse

from headscope import zoo
from headscope.cli.registry import register_task
from headscope.errors import HeadscopeError
from headscope.methods.soft_injection import accuracy
from headscope.tasks.icl import IclTask, PromptFormat
from headscope.validate import nonnegative_int, positive_int


def add_prompt_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``eval --task icl`` and ``inject fit``: the split and the prompt format."""
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the train/val/test split of each task file")
    parser.add_argument("--template", default="Q: {x}\nA: {y}", help="one demonstration; must end with {y}")
    parser.add_argument("--separator", default="\n\n", help="between demonstrations")
    parser.add_argument("--chat-template", choices=("on", "off"), default="off",
                        help="wrap the prompt as a user turn with the tokenizer's chat template")


def prompt_format(args):
    return PromptFormat(template=args.template.replace("\\n", "\n"), separator=args.separator.replace("\\n", "\n"),
                        chat=args.chat_template == "on")


def task_files(args) -> list[str]:
    """--tasks, or the shipped organism's own task files."""
    if args.tasks:
        return args.tasks
    folder = zoo.organism_path(args.model)
    files = zoo.organism_info(args.model).get("task_files")
    if folder is None or not files:
        raise HeadscopeError(f"give the task files with --tasks FILE.jsonl ...; {args.model!r} ships none")
    return [str(folder / f) for f in files]


@register_task("icl", default_model="icl")
def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--tasks", nargs="+", metavar="FILE", help="task JSONL files (default: the organism's)")
    parser.add_argument("--shots", type=nonnegative_int, default=0, help="demonstrations per prompt (0: zero-shot)")
    parser.add_argument("--queries", type=positive_int, default=None,
                        help="draw this many test queries with replacement, each with its own demonstrations "
                             "(default: every test query once)")
    add_prompt_arguments(parser)


def _tasks(args) -> list:
    """The task files read and split, each with enough train pairs for --shots."""
    tasks = [IclTask.load(path, seed=args.split_seed) for path in task_files(args)]
    for task in tasks:
        task.check_shots(args.shots)
    return tasks


def check(args) -> None:
    _tasks(args)
    prompt_format(args)


def evaluate(args, hm) -> dict[str, float]:
    fmt = prompt_format(args)
    values = []
    for task in _tasks(args):
        values.append(accuracy(hm, task, args.shots, fmt=fmt, n=args.queries, seed=args.seed,
                               batch_size=args.batch_size))
        print(f"{task.name}: {values[-1]:.3f}")
    return {"accuracy": sum(values) / len(values)}
