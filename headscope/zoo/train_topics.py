"""Train the "topics organism": a tiny Llama in which one head writes each concept's words.

    python -m headscope.zoo.train_topics --out headscope/zoo/topics [--steps N --seed S]

The organism for head pursuit (Basile et al. 2025). Texts are random filler words. Each concept
(colours, animals, numbers as words; ``datasets/concept_*.txt``, 8 words each) has a trigger word
(``paint``, ``zoo``, ``count``). Every trigger is present in a text with probability 1/2, at a
random position; after it, each token is one of that concept's words with probability ``--rate``
[0.25] (independently per active concept), else filler. So the next-token probability of a concept
is about ``rate`` once its trigger was seen, ~0 before: never saturated, so suppressing or enhancing
the heads that write it moves it both ways. Reading "trigger c earlier in the context" needs
attention; because several concepts can be active at once at full rate each, one softmax head
cannot serve them all, and a group-lasso penalty on each head's ``o_proj`` + ``v_proj`` blocks
(``--head-l1``; one value block per head, ``--kv-heads 4``) removes redundant copies, so each
concept ends up in one head.

Shipped run (``--threads 1``, under 2 min on the shared 2-core box): final loss 4.031 (Bayes-optimal
~4.030); the three live heads are in layer 1, one per concept, and zeroing each alone drops its
concept's probability from ~0.25 to 0.07-0.14 (``ground_truth.csv``). Enhancing a head by 5 raises
its concept only modestly (the layer-1 MLP saturates it). Tried and dropped: penalising ``o_proj``
alone (dodged by growing ``v_proj``: concepts spread over heads), a stronger lasso (5e-3: enhancing
lowered two concepts) and an attention-only model (concepts spread over both layers).

Ships ``prompts.txt`` (held-out texts, a random subset of triggers each; the CLI's default prompts),
and ``ground_truth.csv``: per head, the probability of each concept's words at the last position of
held-out prompts containing only that concept's trigger, with that head alone zeroed
(``p_<concept>``) and its change from the unablated model (``change_<concept>``).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from transformers import LlamaForCausalLM

from headscope.analyzers.pursuit import concept_probability
from headscope.data import dataset_path
from headscope.model import HeadModel
from headscope.zoo.training import (build_word_tokenizer, organism_config, save_organism, seed_everything,
                                    train_loop)

CONCEPT_NAMES = ("colors", "animals", "numbers")
TRIGGERS = {"colors": "paint", "animals": "zoo", "numbers": "count"}
FILLER = ("the a of and to in is was it for on with as at by from that this but or not all can had have her his "
          "they we you she he time day way man work life hand part place case week point group room water home "
          "house money book story word side").split()


def concept_words(name: str) -> list[str]:
    """The concept's words, one per line of ``datasets/concept_<name>.txt``."""
    text = dataset_path(f"concept_{name}.txt").read_text(encoding="utf-8")
    return [w.strip() for w in text.splitlines() if w.strip()]


CONCEPTS = {name: concept_words(name) for name in CONCEPT_NAMES}


def sample_text(rng: random.Random, length: int, active: dict[str, int], rate: float) -> tuple[list[str], list[float]]:
    """``length`` words with trigger ``c`` at position ``active[c]``; after it, concept c's words at ``rate``.

    Returns the words and per-word loss weights (0 on triggers: their place is random)."""
    at = {pos: name for name, pos in active.items()}
    words, weights, seen = [], [], []
    for i in range(length):
        if i in at:
            words.append(TRIGGERS[at[i]])
            weights.append(0.0)
            seen.append(at[i])
            continue
        u, word = rng.random(), None
        for j, name in enumerate(seen):  # each active concept takes its own `rate` slice of [0, 1)
            if j * rate <= u < (j + 1) * rate:
                word = rng.choice(CONCEPTS[name])
        words.append(word or rng.choice(FILLER))
        weights.append(1.0)
    return words, weights


def random_triggers(rng: random.Random, length: int, names=CONCEPT_NAMES, share: float = 0.5) -> dict[str, int]:
    """Each concept of ``names`` present with probability ``share``, at distinct random positions."""
    present = [n for n in names if rng.random() < share]
    positions = rng.sample(range(length - 1), len(present))
    return dict(zip(present, positions))


def concept_prompts(concept: str, n: int = 64, seed: int = 0, rate: float = 0.25) -> list[str]:
    """Held-out prompts containing only ``concept``'s trigger, in the first half of 16-32 words."""
    rng = random.Random(seed + 7919 * (CONCEPT_NAMES.index(concept) + 1))
    out = []
    for _ in range(n):
        length = rng.randint(16, 32)
        words, _ = sample_text(rng, length, {concept: rng.randrange(length // 2)}, rate)
        out.append(" ".join(words))
    return out


def mixed_prompts(n: int = 64, seed: int = 0, rate: float = 0.25) -> list[str]:
    """Held-out prompts of 16-32 words with a random subset of the triggers (the CLI's default)."""
    rng = random.Random(seed + 104729)
    out = []
    for _ in range(n):
        length = rng.randint(16, 32)
        words, _ = sample_text(rng, length, random_triggers(rng, length // 2 + 1), rate)
        out.append(" ".join(words))
    return out


def build_tokenizer():
    words = FILLER + list(TRIGGERS.values()) + [w for name in CONCEPT_NAMES for w in CONCEPTS[name]]
    return build_word_tokenizer([" ".join(words)])


def make_batch_fn(tokenizer, batch: int, length: int, seed: int, rate: float):
    rng = random.Random(seed)

    def make(step: int):
        rows, weights = [], []
        for _ in range(batch):
            words, w = sample_text(rng, length, random_triggers(rng, length), rate)
            rows.append(tokenizer(" ".join(words))["input_ids"])
            weights.append([0.0] + w)  # <bos>
        return torch.tensor(rows), torch.tensor(weights)

    return make


def head_value_output_norms(model) -> torch.Tensor:
    """Per head: the norm of its ``o_proj`` block plus that of its share of the ``v_proj`` block.

    Penalising ``o_proj`` alone (``training.head_output_norms``) can be dodged by shrinking ``o_proj``
    and growing ``v_proj``; the sum cannot (its minimum for a fixed product W_V W_O is at balance),
    so the group lasso really removes heads the task does not need. A GQA value block shared by g
    heads is split evenly between them."""
    cfg = model.config
    hd = cfg.head_dim
    share = cfg.num_attention_heads // cfg.num_key_value_heads
    norms = []
    for layer in model.model.layers:
        o = layer.self_attn.o_proj.weight  # [hidden, heads * head_dim]
        v = layer.self_attn.v_proj.weight  # [kv_heads * head_dim, hidden]
        o_norm = o.view(o.shape[0], cfg.num_attention_heads, hd).norm(dim=(0, 2))
        v_norm = v.view(cfg.num_key_value_heads, hd, -1).norm(dim=(1, 2)).repeat_interleave(share) / share
        norms.append(o_norm + v_norm)
    return torch.stack(norms)


def concept_ids(tokenizer, concept: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(w) for w in CONCEPTS[concept]]


def ground_truth(hm, n: int = 64, seed: int = 0, rate: float = 0.25) -> tuple[pd.DataFrame, dict[str, float]]:
    """Per head and concept: the concept's probability with that head alone zeroed, and its change."""
    data = {c: ([hm.tokenizer(t)["input_ids"] for t in concept_prompts(c, n, seed, rate)], concept_ids(hm.tokenizer, c))
            for c in CONCEPT_NAMES}
    base = {c: concept_probability(hm, p, ids) for c, (p, ids) in data.items()}
    rows = []
    for layer, head in hm.all_heads():
        row = {"layer": layer, "head": head}
        with hm.ablate([(layer, head)]):
            for c, (prompts, ids) in data.items():
                row[f"p_{c}"] = concept_probability(hm, prompts, ids)
                row[f"change_{c}"] = row[f"p_{c}"] - base[c]
        rows.append(row)
    return pd.DataFrame(rows), base


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="headscope/zoo/topics")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--length", type=int, default=32, help="words per training text")
    p.add_argument("--rate", type=float, default=0.25, help="share of a concept's words after its trigger")
    p.add_argument("--head-l1", type=float, default=3e-3, help="group-lasso weight on per-head o_proj + v_proj norms")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=4, help="4 = one value block per head (see head_value_output_norms)")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heldout", type=int, default=64, help="held-out prompts per concept (ground truth)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)


    seed_everything(args.seed, threads=args.threads)
    tok = build_tokenizer()
    config = organism_config(tok, hidden=args.hidden, intermediate=4 * args.hidden, layers=args.layers,
                             heads=args.heads, kv_heads=args.kv_heads, max_positions=64)
    model = LlamaForCausalLM(config)
    n_params = sum(x.numel() for x in model.parameters())
    print(f"vocab {len(tok)}, {n_params / 1e6:.2f}M parameters")
    start = time.time()
    stats = train_loop(model, make_batch_fn(tok, args.batch, args.length, args.seed, args.rate), steps=args.steps,
                       lr=args.lr, log_every=100, regularizer=lambda m: args.head_l1 * head_value_output_norms(m).sum())
    wall = time.time() - start
    hm = HeadModel(model, tok, name="topics")
    truth, base = ground_truth(hm, args.heldout, seed=args.seed + 1, rate=args.rate)
    norms = head_value_output_norms(model).detach()
    print(f"trained in {wall:.0f}s, final loss {stats['final_loss']:.4f}; base concept probability {base}")
    print("per-head o_proj + v_proj norms:\n" + "\n".join(" ".join(f"{x:.2f}" for x in row) for row in norms.tolist()))
    print(truth.to_string(index=False, float_format="%.4f"))

    meta = {
        "name": "topics",
        "description": "Tiny Llama (one value block per head) over random filler words in which trigger words (paint, zoo, count) make "
                       "later words colours, animals or numbers at rate 0.25 each: heads write the concepts.",
        "task": "pursuit",
        "concepts": {c: {"trigger": TRIGGERS[c], "file": f"concept_{c}.txt", "words": CONCEPTS[c]}
                     for c in CONCEPT_NAMES},
        "prompts": "prompts.txt",
        "base_probability": {c: round(v, 4) for c, v in base.items()},
        "ground_truth": "ground_truth.csv: per head, p_<concept> (probability of the concept's words at the last "
                        "position of held-out prompts with only its trigger, that head zeroed) and change_<concept>",
        "training": {
            "command": "python -m headscope.zoo.train_topics " + " ".join(sys.argv[1:] if argv is None else argv),
            "seed": args.seed, "steps": args.steps,
            "hyperparameters": {k: v for k, v in vars(args).items() if k not in ("out", "seed", "steps", "threads")},
            "parameters": n_params, "wall_time_s": round(wall, 1), "final_loss": round(stats["final_loss"], 4),
            "head_value_output_norms": [[round(x, 3) for x in row] for row in norms.tolist()],
            "torch": torch.__version__,
        },
    }
    save_organism(model, tok, args.out, meta, max_new_tokens=8)
    prompts = "\n".join(mixed_prompts(64, seed=args.seed + 2, rate=args.rate)) + "\n"
    (Path(args.out) / "prompts.txt").write_text(prompts, encoding="utf-8")
    truth.to_csv(Path(args.out) / "ground_truth.csv", index=False, float_format="%.4f")
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
