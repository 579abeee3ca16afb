"""``--task context-conflict``: context-faithfulness on swapped contexts (NQ-Swap style).

``eval`` prints ``accuracy`` = the share of swapped-context prompts answered with the context's
value (context-faithful accuracy), after ``memory_rate`` (answered with the memorised value).
With ``--decore CSV --top K`` (or ``--random K --random-edit decore``) it decodes with DeCoRe.
``score`` ranks retrieval heads (Wu et al. 2024) on the organism's own context prompts: the needle
is the context statement, the answer the context's value.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from headscope import zoo
from headscope.analyzers.retrieval import retrieval_heads
from headscope.cli.registry import register_task
from headscope.cli.tasks.needle import add_retrieval_arguments, retrieval_options
from headscope.errors import HeadscopeError
from headscope.hf.inputs import pad_id
from headscope.methods.decore import decore_generate
from headscope.progress import tqdm
from headscope.tasks.context_conflict import ContextConflictTask, make_world
from headscope.validate import positive_int

SCORE_SEED = 99  # the scoring prompts are drawn apart from the evaluation prompts (seed 1234)


@register_task("context-conflict", default_model="context_conflict", supports_decore=True)
def add_arguments(parser, command: str) -> None:
    parser.add_argument("--prompts", type=positive_int, default=192, help="number of swapped-context prompts")
    if command == "score":
        add_retrieval_arguments(parser)
    else:
        parser.add_argument("--prompt-seed", type=int, default=1234, help="seed of the evaluation prompts")


def task_for(hm):
    if hm.tokenizer is None:
        raise HeadscopeError("the context-conflict task needs the model's tokenizer")
    world = zoo.organism_info("context_conflict").get("world", {})
    return ContextConflictTask(hm.tokenizer, make_world(seed=world.get("seed", 0)))


def trials(args, hm, seed: int):
    return task_for(hm).eval_trials(args.prompts, seed=seed)


def score(args, hm):
    return retrieval_heads(hm, trials(args, hm, SCORE_SEED), **retrieval_options(args))


def _by_length(items):
    groups = defaultdict(list)
    for i, t in enumerate(items):
        groups[len(t.prompt_ids)].append(i)
    return list(groups.values())


@torch.no_grad()
def first_tokens(hm, items, batch_size: int = 8, decore_heads=None, decore_alpha=None, progress=False) -> list[int]:
    """The first token each prompt is answered with: greedy generate(), or DeCoRe with ``decore_heads``."""
    out = [0] * len(items)
    pad = pad_id(hm.tokenizer)
    chunks = [g[s : s + batch_size] for g in _by_length(items) for s in range(0, len(g), batch_size)]
    for idx in tqdm(chunks, desc="context-conflict", disable=not progress):
        ids = torch.tensor([items[i].prompt_ids for i in idx], device=hm.device)
        if decore_heads is not None:
            seq = decore_generate(hm, ids, decore_heads, max_new_tokens=1, alpha=decore_alpha).sequences
        else:
            seq = hm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
                                    pad_token_id=pad)
        for i, token in zip(idx, seq[:, ids.shape[1]].tolist()):
            out[i] = token
    return out


def evaluate(args, hm) -> dict[str, float]:
    items = trials(args, hm, args.prompt_seed)
    answers = first_tokens(hm, items, args.batch_size, getattr(args, "decore_heads", None),
                           getattr(args, "decore_alpha", None), progress=not args.quiet)
    faithful = sum(a == t.answer_ids[0] for a, t in zip(answers, items)) / len(items)
    memory = sum(a == t.memory_ids[0] for a, t in zip(answers, items)) / len(items)
    return {"memory_rate": memory, "accuracy": faithful}
