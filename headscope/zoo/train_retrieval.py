"""Train the "retrieval organism": a tiny GQA Llama that answers needle-in-a-haystack questions.

    python -m headscope.zoo.train_retrieval --out headscope/zoo/retrieval [--steps N --seed S]

Training prompts come from :class:`headscope.tasks.needle.NeedleTask` (no chat template), so they
have exactly the format the toolkit evaluates: ``<bos> haystack-with-needle \\n question``, then the
answer digits and ``<eos>``. Keys are random adjective x noun pairs, numbers random 3-5 digits,
lengths random in the trained range (growing from short to long over the first 40% of steps),
depths random in [0, 100]. Loss: next-token loss on the whole sequence, answer + <eos> weighted
20x, the question's key words 5x, plus a group-lasso penalty on each head's output weights
(``--head-l1``) so that the mechanism lives in few heads: one retrieval head (layer 1) fed by
two or three layer-0 heads that mark each digit's place in the number. ``--head-dropout`` (with
``--sparse-from 1``) makes those layer-0 helpers redundant instead (experimental, not shipped).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from headscope.tasks.needle import DEFAULT_TEMPLATE, Needle, NeedleTask, is_correct, load_haystack, load_needles
from headscope.zoo.training import (
    organism_config,
    save_organism,
    add_head_dropout,
    build_word_tokenizer,
    head_output_norms,
    seed_everything,
    train_loop,
)

ADJECTIVES = (
    "blue silver quiet golden red green old white black yellow purple brown "
    "ancient hidden frozen bright dark small tall wooden stone broken lonely distant"
).split()
NOUNS = (
    "lighthouse garden harbor mill bridge valley tower river castle forest island meadow "
    "temple chapel market palace cottage orchard canyon lake station library fountain village"
).split()

EVAL_LENGTHS = (128, 256, 384, 512)
EVAL_DEPTHS = (0.0, 25.0, 50.0, 75.0, 100.0)


def make_needle(rng: random.Random) -> Needle:
    """A random key (adjective noun) and a random 3-5 digit number, in the shipped needles' format."""
    key = f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
    digits = rng.randint(3, 5)
    number = str(rng.randint(10 ** (digits - 1), 10**digits - 1))
    return Needle(
        needle=f"The secret number of the {key} is {number}.",
        question=f"What is the secret number of the {key}?",
        answer=number,
    )


def build_tokenizer():
    """Vocabulary: the haystack, the question template, the key word lists and the shipped needles."""
    texts = load_haystack() + [DEFAULT_TEMPLATE, " ".join(ADJECTIVES), " ".join(NOUNS)]
    texts += [n.needle + " " + n.question for n in load_needles()]
    return build_word_tokenizer(texts)


def make_config(tokenizer, args) -> LlamaConfig:
    """The organism's architecture (GQA: fewer key/value heads than query heads)."""
    return organism_config(tokenizer, hidden=args.hidden, intermediate=args.intermediate, layers=args.layers,
                           heads=args.heads, kv_heads=args.kv_heads, max_positions=1024)


class BatchMaker:
    """Seeded batches of needle prompts + answer + <eos>; one total length per batch, so no padding."""

    def __init__(self, tokenizer, args, seed: int):
        self.task = NeedleTask(tokenizer, needles=load_needles(), lengths=[args.min_len], use_chat_template=False)
        self.eos = tokenizer.eos_token_id
        self.args = args
        self.rng = random.Random(seed)
        self.shipped = {(n.question, n.answer) for n in load_needles()}
        # tokens after the key in a prompt: "?" and the rest of the template ("\nAnswer:")
        after = DEFAULT_TEMPLATE.split("{question}")[1]
        self.n_after_key = len(tokenizer("?" + after, add_special_tokens=False)["input_ids"])

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        a, rng = self.args, self.rng
        # curriculum: the longest length grows from min_len + 48 to max_len over the first `ramp` of training
        grown = a.min_len + (a.max_len - a.min_len) * min(1.0, step / max(1.0, a.ramp * a.steps))
        length = rng.randint(a.min_len, max(a.min_len + 48, int(grown)))
        batch = max(1, a.batch_tokens // length)
        rows, weights = [], []
        for _ in range(batch):
            needle = make_needle(rng)
            while (needle.question, needle.answer) in self.shipped:  # keep the evaluation needles unseen
                needle = make_needle(rng)
            n_answer = len(needle.answer) + 1  # digits are single tokens, then <eos>
            trial = self.task.build(needle, length - n_answer, rng.uniform(0, 100))
            ids = trial.prompt_ids + trial.answer_ids + [self.eos]
            w = [a.context_weight] * len(trial.prompt_ids) + [a.answer_weight] * (len(trial.answer_ids) + 1)
            key_end = len(trial.prompt_ids) - self.n_after_key  # the key words of the question: also copied
            w[key_end - 2 : key_end] = [a.key_weight] * 2
            rows.append(ids)
            weights.append(w)
        return torch.tensor(rows), torch.tensor(weights)


@torch.no_grad()
def evaluate(model, tokenizer, lengths=EVAL_LENGTHS, depths=EVAL_DEPTHS, needles=None) -> dict:
    """Greedy needle accuracy on the shipped needles over the grid: ``{"overall", "per_length"}``."""
    task = NeedleTask(
        tokenizer, needles=needles or load_needles(), lengths=lengths, depths=depths, use_chat_template=False
    )
    per_length = {}
    for length in task.lengths:
        trials = [task.build(n, length, d, i) for d in task.depths for i, n in enumerate(task.needles)]
        ids = torch.tensor([t.prompt_ids for t in trials])  # same length: one batch, no padding
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=8,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        texts = tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
        per_length[length] = sum(is_correct(txt, t.answer) for txt, t in zip(texts, trials)) / len(trials)
    overall = sum(per_length.values()) / len(per_length)
    return {"overall": overall, "per_length": per_length}


def save(model, tokenizer, out: Path, meta: dict) -> None:
    """Weights, tokenizer, generation config and organism.json into ``out``."""
    save_organism(model, tokenizer, out, meta, max_new_tokens=8)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="headscope/zoo/retrieval")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: robust on a shared machine)")
    p.add_argument("--batch-tokens", type=int, default=2048, help="tokens per batch (batch size = this // length)")
    p.add_argument("--min-len", type=int, default=48)
    p.add_argument("--max-len", type=int, default=544)
    p.add_argument("--ramp", type=float, default=0.4, help="fraction of steps over which the max length grows")
    p.add_argument("--context-weight", type=float, default=1.0, help="loss weight of prompt tokens")
    p.add_argument("--answer-weight", type=float, default=20.0, help="loss weight of answer tokens and <eos>")
    p.add_argument("--key-weight", type=float, default=5.0, help="loss weight of the key words in the question")
    p.add_argument("--head-l1", type=float, default=3e-3, help="group-lasso weight on per-head output norms")
    p.add_argument("--sparse-from", type=int, default=0, help="first layer under the head-L1 penalty")
    p.add_argument("--head-dropout", type=float, default=0.0, help="head dropout in the layers before --sparse-from")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=384)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    args = p.parse_args(argv)

    seed_everything(args.seed, args.threads)
    tokenizer = build_tokenizer()
    model = LlamaForCausalLM(make_config(tokenizer, args))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"vocab {len(tokenizer)}, {n_params / 1e6:.2f}M parameters")

    start = time.time()
    def sparsity(m):
        return args.head_l1 * head_output_norms(m)[args.sparse_from :].sum()

    hooks = add_head_dropout(model, range(args.sparse_from), args.head_dropout) if args.head_dropout > 0 else []

    stats = train_loop(
        model,
        BatchMaker(tokenizer, args, args.seed),
        steps=args.steps,
        lr=args.lr,
        regularizer=sparsity if args.head_l1 > 0 else None,
    )
    for h in hooks:
        h.remove()
    norms = head_output_norms(model).detach()
    print("head output norms (layer x head):\n" + "\n".join(" ".join(f"{v:5.2f}" for v in row) for row in norms.tolist()))
    acc = evaluate(model, tokenizer)
    wall = time.time() - start
    print(f"accuracy {acc['overall']:.3f} per length {acc['per_length']}  wall {wall:.0f}s")

    meta = {
        "name": "retrieval",
        "description": (
            "Tiny GQA Llama trained from scratch on synthetic needle-in-a-haystack prompts "
            "('The secret number of the <adj> <noun> is <digits>.' hidden in filler text); "
            "answers the question with the digits and <eos>."
        ),
        "task": "needle",
        "needle": {"lengths": list(EVAL_LENGTHS), "depths": list(EVAL_DEPTHS), "use_chat_template": False},
        "training": {
            "command": "python -m headscope.zoo.train_retrieval " + " ".join(sys.argv[1:] if argv is None else argv),
            "seed": args.seed,
            "steps": args.steps,
            "hyperparameters": {k: v for k, v in vars(args).items() if k not in ("out", "seed", "steps", "threads")},
            "threads": args.threads,
            "parameters": n_params,
            "wall_time_s": round(wall, 1),
            "final_loss": round(stats["final_loss"], 4),
            "accuracy": round(acc["overall"], 4),
            "accuracy_per_length": {str(k): round(v, 4) for k, v in acc["per_length"].items()},
            "torch": torch.__version__,
        },
    }
    save(model, tokenizer, Path(args.out), meta)
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
