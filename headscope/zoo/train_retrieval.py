"""Train the "retrieval organism": a tiny GQA Llama that answers needle-in-a-haystack questions.

    python -m headscope.zoo.train_retrieval --out headscope/zoo/retrieval [--steps N --seed S]

Training prompts come from :class:`headscope.tasks.needle.NeedleTask` (no chat template), so they
have exactly the format the toolkit evaluates: ``<bos> haystack-with-needle \\n question``, then the
answer digits and ``<eos>``. Keys are random adjective x noun pairs, numbers random 3-5 digits
with no digit repeated (``--distinct-digits``, like the shipped needles), lengths random in the
trained range (growing from short to long over the first 40% of the needle steps), depths random
in [0, 100]. Loss: next-token loss on the whole sequence, answer + <eos> weighted 20x, the
question's key words 5x, plus a group-lasso penalty on each head's output weights (``--head-l1``)
so that the mechanism lives in few heads.

Retrieval heads in LLMs are a subset of induction heads (Wu et al. 2024), learnt from the repeated
spans of natural text; the haystack here is one fixed text the model memorises, so nothing in it
teaches induction. So training starts with ``--pretrain-steps`` of induction data only (rows of
random words repeated with a random period, loss on the repeats; head penalty
``--pretrain-head-l1``), then runs the needle steps with ``--repeat-frac`` of the rows still
induction data. With distinct digits, copying the number by induction is exact.

Shipped run (the defaults, seed 0, 626 s at 1 thread; a rerun gave identical weights): induction
heads form abruptly after ~900 induction-only steps; needle accuracy 0.994; the top-3 retrieval
heads (1,5), (1,4), (1,6) are the top-3 induction heads (0.47); ablating them leaves 0.13, while
each alone costs 0.125 / 0.019 / 0.006 (they back each other up). Measured alternatives: induction
rows mixed in from the start, or after only 1200 induction-only steps, formed no induction head in
2000-4000 steps (repeat loss ~5.6 nats, uniform ~5.8); a weaker penalty (3e-3) made all 8 layer-1
heads redundant induction heads (top-3 ablated: 0.82-0.93). The earlier organism (``--pretrain-steps 0
--repeat-frac 0 --distinct-digits 0 --head-l1 3e-3``) copied digits by their place in the number
(layer-0 heads mark positions): no induction head at all. ``--head-dropout`` (with
``--sparse-from 1``) makes layer-0 helpers redundant instead (experimental).
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
    head_dropout,
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


def make_needle(rng: random.Random, distinct_digits: bool = False) -> Needle:
    """A random key (adjective noun) and a random 3-5 digit number, in the shipped needles' format.

    ``distinct_digits``: no digit repeats within the number (as in the shipped needles), so the
    digit just written names the next one uniquely and copying by induction is enough.
    """
    key = f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
    n_digits = rng.randint(3, 5)
    if distinct_digits:
        first = rng.choice("123456789")
        number = first + "".join(rng.sample([d for d in "0123456789" if d != first], n_digits - 1))
    else:
        number = str(rng.randint(10 ** (n_digits - 1), 10**n_digits - 1))
    return Needle(
        needle=f"The secret number of the {key} is {number}.",
        question=f"What is the secret number of the {key}?",
        answer=number,
    )


def build_tokenizer():
    """Vocabulary: the haystack, the question template, the key word lists and the shipped needles.
    Numbers decode as written (digits joined), so the decode variant's word-level ROUGE-1 filter
    sees "8165" as one word, as with an LLM's tokenizer."""
    texts = load_haystack() + [DEFAULT_TEMPLATE, " ".join(ADJECTIVES), " ".join(NOUNS)]
    texts += [n.needle + " " + n.question for n in load_needles()]
    return build_word_tokenizer(texts, join_digits=True)


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
        self.bos = tokenizer.bos_token_id
        self.words = [i for i in range(len(tokenizer)) if i not in set(tokenizer.all_special_ids)]

    def repeat_row(self, length: int) -> tuple[list[int], list[float]]:
        """Induction data: random words repeated with a random period, loss on the repeats only.

        Natural text repeats spans (names, numbers, phrases) and LMs learn induction heads from it;
        the haystack here is one fixed text, so the repeats are made explicit. The first token of
        each repeat cannot be predicted and gets weight 0.
        """
        a, rng = self.args, self.rng
        period = rng.randint(a.min_period, max(a.min_period, (length - 1) // 2))
        chunk = [rng.choice(self.words) for _ in range(period)]
        ids = [self.bos] + (chunk * (length // period + 1))[: length - 1]
        w = [0.0] * (period + 2) + [a.repeat_weight] * (length - period - 2)
        return ids, w

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        a, rng = self.args, self.rng
        if step < a.pretrain_steps:  # phase 1: induction data only, until induction heads form
            length = rng.randint(a.min_len, a.pretrain_max_len)
            rows, weights = zip(*(self.repeat_row(length) for _ in range(max(1, a.pretrain_batch_tokens // length))))
            return torch.tensor(rows, device=a.device), torch.tensor(weights, device=a.device)
        step -= a.pretrain_steps
        # curriculum: the longest length grows from min_len + 48 to max_len over the first `ramp` of the needle steps
        grown = a.min_len + (a.max_len - a.min_len) * min(1.0, step / max(1.0, a.ramp * a.steps))
        length = rng.randint(a.min_len, max(a.min_len + 48, int(grown)))
        batch = max(1, a.batch_tokens // length)
        rows, weights = [], []
        n_repeat = sum(rng.random() < a.repeat_frac for _ in range(batch)) if a.repeat_frac > 0 else 0
        for _ in range(batch - n_repeat):
            needle = make_needle(rng, a.distinct_digits)
            while (needle.question, needle.answer) in self.shipped:  # keep the evaluation needles unseen
                needle = make_needle(rng, a.distinct_digits)
            n_answer = len(needle.answer) + 1  # digits are single tokens, then <eos>
            trial = self.task.build(needle, length - n_answer, rng.uniform(0, 100))
            ids = trial.prompt_ids + trial.answer_ids + [self.eos]
            w = [a.context_weight] * len(trial.prompt_ids) + [a.answer_weight] * (len(trial.answer_ids) + 1)
            key_end = len(trial.prompt_ids) - self.n_after_key  # the key words of the question: also copied
            w[key_end - 2 : key_end] = [a.key_weight] * 2
            rows.append(ids)
            weights.append(w)
        for _ in range(n_repeat):
            ids, w = self.repeat_row(length)
            rows.append(ids)
            weights.append(w)
        return torch.tensor(rows, device=a.device), torch.tensor(weights, device=a.device)


@torch.no_grad()
def evaluate(model, tokenizer, lengths=EVAL_LENGTHS, depths=EVAL_DEPTHS, needles=None) -> dict:
    """Greedy needle accuracy on the shipped needles over the grid: ``{"overall", "per_length"}``."""
    task = NeedleTask(
        tokenizer, needles=needles or load_needles(), lengths=lengths, depths=depths, use_chat_template=False
    )
    per_length = {}
    for length in task.lengths:
        trials = [task.build(n, length, d, i) for d in task.depths for i, n in enumerate(task.needles)]
        ids = torch.tensor([t.prompt_ids for t in trials], device=model.device)  # same length: one batch, no padding
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


@torch.no_grad()
def induction_loss(model, tokenizer, n: int = 16, half: int = 64, seed: int = 0) -> float:
    """Mean next-token loss on the second copy of ``n`` random word sequences repeated twice
    (log |vocab| ~ 6 without induction, ~0 with it), the first token of the copy excluded."""
    g = torch.Generator().manual_seed(seed)
    special = set(tokenizer.all_special_ids)
    words = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    first = words[torch.randint(len(words), (n, half), generator=g)]
    ids = torch.cat([torch.full((n, 1), tokenizer.bos_token_id), first, first], 1).to(model.device)
    logp = model(input_ids=ids).logits[:, :-1].float().log_softmax(-1)
    nll = -logp.gather(-1, ids[:, 1:, None])[..., 0]
    return float(nll[:, half + 1 :].mean())


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
    p.add_argument("--pretrain-steps", type=int, default=2000,
                   help="steps of induction data only before the needle steps (--steps)")
    p.add_argument("--pretrain-head-l1", type=float, default=1e-2, help="head-L1 weight in the first phase")
    p.add_argument("--pretrain-max-len", type=int, default=132, help="longest induction row in the first phase")
    p.add_argument("--pretrain-batch-tokens", type=int, default=1024, help="tokens per batch in the first phase")
    p.add_argument("--repeat-frac", type=float, default=0.25,
                   help="probability that a row is induction data (random words repeated), not a needle prompt")
    p.add_argument("--repeat-weight", type=float, default=1.0, help="loss weight of the repeated words")
    p.add_argument("--min-period", type=int, default=4, help="shortest period of the repeated random words")
    p.add_argument("--distinct-digits", type=int, default=1, help="1: training numbers have no repeated digit")
    p.add_argument("--device", default="cpu", help="torch device (cpu: the shipped organism)")
    p.add_argument("--head-l1", type=float, default=1e-2, help="group-lasso weight on per-head output norms")
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
    model = LlamaForCausalLM(make_config(tokenizer, args)).to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"vocab {len(tokenizer)}, {n_params / 1e6:.2f}M parameters")

    start = time.time()
    calls = [0]

    def sparsity(m):  # --pretrain-head-l1 in the induction-only phase, --head-l1 after it
        calls[0] += 1
        weight = args.head_l1 if calls[0] > args.pretrain_steps else args.pretrain_head_l1
        return weight * head_output_norms(m)[args.sparse_from :].sum()

    with head_dropout(model, range(args.sparse_from), args.head_dropout):
        stats = train_loop(
            model,
            BatchMaker(tokenizer, args, args.seed),
            steps=args.pretrain_steps + args.steps,
            lr=args.lr,
            regularizer=sparsity if max(args.head_l1, args.pretrain_head_l1) > 0 else None,
        )
    norms = head_output_norms(model).detach()
    print("head output norms (layer x head):\n" + "\n".join(" ".join(f"{v:5.2f}" for v in row) for row in norms.tolist()))
    acc = evaluate(model, tokenizer)
    wall = time.time() - start
    repeat_loss = induction_loss(model, tokenizer)
    print(f"accuracy {acc['overall']:.3f} per length {acc['per_length']}  induction loss {repeat_loss:.3f}  "
          f"wall {wall:.0f}s")

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
            "hyperparameters": {k: v for k, v in vars(args).items()
                                if k not in ("out", "seed", "steps", "threads", "device")},
            "threads": args.threads,
            "parameters": n_params,
            "wall_time_s": round(wall, 1),
            "final_loss": round(stats["final_loss"], 4),
            "accuracy": round(acc["overall"], 4),
            "induction_loss": round(repeat_loss, 4),
            "accuracy_per_length": {str(k): round(v, 4) for k, v in acc["per_length"].items()},
            "torch": torch.__version__,
        },
    }
    save(model.cpu(), tokenizer, Path(args.out), meta)
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
