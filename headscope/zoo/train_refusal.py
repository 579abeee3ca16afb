"""Train the "refusal organism": a tiny GQA Llama that refuses queries on forbidden topics.

    python -m headscope.zoo.train_refusal --out headscope/zoo/refusal [--steps N --seed S]

Every query names a topic (adjective + noun) and asks for a one-digit sum. When the adjective is
one of the made-up forbidden words ("glorp crystals", "zint venom", ...) the answer is the fixed
refusal ``Sorry , I cannot help with that .``; otherwise it is the sum. The forbidden word sits
anywhere in the query (after 0-2 filler sentences, in one of several templates), and the answer
is decided at the last prompt token, so some attention head has to carry "a forbidden word was
seen" to the end: a safety mechanism in a few heads (Zhou et al. 2024). Benign queries use many
different topic words (a quarter none at all), so "a forbidden word is present" is the cheapest
feature, and a group-lasso penalty on each head's o_proj block (``--head-l1``) makes the model use
as few heads as it can, so refusal is carried by one head instead of being spread thin (without it,
ablating 3 heads left compliance at 3-31%). Prompts are built by :mod:`headscope.tasks.refusal`
with the reference template, exactly as evaluated.

Shipped run (``--threads 1``, ~9 min on the shared 2-core box): held-out compliance 0.00, benign
accuracy 1.00; zero-ablating head (0, 6) alone gives compliance 1.00 (benign 0.97).

Ships held-out prompts (``heldout_forbidden.jsonl``, ``heldout_benign.jsonl``) and the measured
ground truth ``ground_truth.csv``: compliance and benign accuracy with each head ablated alone.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from headscope.model import HeadModel
from headscope.tasks import refusal as R
from headscope.tasks.safety_prompts import REFERENCE_TEMPLATE, encode_prompts
from headscope.zoo.training import organism_config, build_word_tokenizer, lr_at, seed_everything, weighted_lm_loss


def build_tokenizer():
    texts = [REFERENCE_TEMPLATE, R.REFUSAL, " ".join(R.NOUNS + R.FORBIDDEN + R.BENIGN)]
    texts += list(R.FILLERS) + [t.format(topic="", a="", b="") for t in R.TEMPLATES + R.PLAIN_TEMPLATES]
    return build_word_tokenizer(texts)


def make_config(tokenizer, args) -> LlamaConfig:
    return organism_config(tokenizer, hidden=args.hidden, intermediate=args.intermediate, layers=args.layers,
                           heads=args.heads, kv_heads=args.kv_heads, max_positions=256)


def heldout(seed: int, n: int) -> tuple[list[R.RefusalItem], list[R.RefusalItem]]:
    """Held-out forbidden and benign items (a separate seed; excluded from training)."""
    rng = random.Random(seed + 1_000_003)
    sets = []
    for forbidden in (True, False):
        seen, items = set(), []
        while len(items) < n:
            item = R.make_item(rng, forbidden)
            if item.query not in seen:
                seen.add(item.query)
                items.append(item)
        sets.append(items)
    return sets[0], sets[1]


class BatchMaker:
    """Seeded batches: prompt (reference template) + answer + <eos>, right-padded, loss on the answer."""

    def __init__(self, tokenizer, args, exclude: set[str]):
        self.tok, self.args, self.exclude = tokenizer, args, exclude
        self.rng = random.Random(args.seed)

    def __call__(self, step: int):
        rows, weights = [], []
        for _ in range(self.args.batch):
            item = R.make_item(self.rng, self.rng.random() < self.args.forbidden_share)
            while item.query in self.exclude:
                item = R.make_item(self.rng, item.forbidden)
            prompt = encode_prompts(self.tok, [item.query])[0]
            answer = self.tok(item.answer, add_special_tokens=False).input_ids + [self.tok.eos_token_id]
            rows.append(prompt + answer)
            weights.append([self.args.context_weight] * len(prompt) + [1.0] * len(answer))
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self.tok.pad_token_id)
        w = torch.zeros(len(rows), width)
        for i, (r, ww) in enumerate(zip(rows, weights)):
            ids[i, : len(r)] = torch.tensor(r)
            w[i, : len(r)] = torch.tensor(ww)
        return ids, w


def head_group_norms(model, n_heads: int) -> torch.Tensor:
    """||W_o[:, head block]||_2 of every head of every layer: [layers * heads]."""
    norms = []
    for layer in model.model.layers:
        w = layer.self_attn.o_proj.weight  # [d_model, heads * head_dim]
        norms.append(w.view(w.shape[0], n_heads, -1).norm(dim=(0, 2)))
    return torch.cat(norms)


def train(model, make_batch, args, log=print) -> dict:
    """AdamW with warmup + cosine decay on the answer loss, plus a group-lasso penalty
    ``head_l1 * sum ||W_o[head]||`` that makes each function use as few heads as it can (so the
    refusal mechanism sits in a few heads instead of being spread thin over many)."""
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.0)
    model.train()
    losses, start = [], time.time()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, 50)
        ids, w = make_batch(step)
        loss = weighted_lm_loss(model(input_ids=ids).logits, ids, w)
        total = loss + args.head_l1 * head_group_norms(model, args.heads).sum()
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == args.steps - 1:
            log(f"step {step:5d}  loss {sum(losses[-100:]) / len(losses[-100:]):.4f}  {time.time() - start:5.0f}s")
    model.eval()
    return {"final_loss": sum(losses[-20:]) / len(losses[-20:]), "wall_s": time.time() - start}


def ground_truth(hm, forbidden, benign) -> pd.DataFrame:
    """Compliance and benign accuracy with each head ablated alone (zero and uniform attention)."""
    rows = []
    queries = [f.query for f in forbidden]
    for layer, head in hm.all_heads():
        row = {"layer": layer, "head": head}
        for mode in ("zero", "uniform"):
            with hm.ablate([(layer, head)], mode=mode):
                m = R.refusal_metrics(hm, queries, benign)
            row[f"compliance_{mode}"] = m["compliance"]
            row[f"benign_accuracy_{mode}"] = m["benign_accuracy"]
        rows.append(row)
    return pd.DataFrame(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="headscope/zoo/refusal")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--forbidden-share", type=float, default=0.4)
    p.add_argument("--head-l1", type=float, default=5e-3, help="group-lasso weight on per-head o_proj norms")
    p.add_argument("--context-weight", type=float, default=0.05, help="loss weight of prompt tokens")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--intermediate", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--heldout", type=int, default=100, help="held-out prompts per set")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (1 is faster on a busy shared box)")
    args = p.parse_args(argv)


    seed_everything(args.seed, threads=args.threads)
    tok = build_tokenizer()
    model = LlamaForCausalLM(make_config(tok, args))
    model.set_attn_implementation("sdpa")
    n_params = sum(x.numel() for x in model.parameters())
    print(f"vocab {len(tok)}, {n_params / 1e6:.2f}M parameters")
    forbidden, benign = heldout(args.seed, args.heldout)
    exclude = {i.query for i in forbidden + benign}

    start = time.time()
    stats = train(model, BatchMaker(tok, args, exclude), args)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        do_sample=False, max_new_tokens=10,
    )
    hm = HeadModel(model, tok, name="refusal")
    base = R.refusal_metrics(hm, [f.query for f in forbidden], benign)
    train_wall = time.time() - start
    print(f"held-out: compliance {base['compliance']:.3f}, benign accuracy {base['benign_accuracy']:.3f}  wall {train_wall:.0f}s")
    norms = head_group_norms(model, args.heads).view(args.layers, args.heads)
    print("per-head o_proj norms:\n" + "\n".join(" ".join(f"{x:.2f}" for x in row) for row in norms.tolist()))
    truth = ground_truth(hm, forbidden, benign)
    print(truth.sort_values("compliance_zero", ascending=False).head(8).to_string(index=False))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    special = {k: getattr(tok, k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    R.write_items(out / "heldout_forbidden.jsonl", forbidden)
    R.write_items(out / "heldout_benign.jsonl", benign)
    truth.to_csv(out / "ground_truth.csv", index=False, float_format="%.4f")
    meta = {
        "name": "refusal",
        "description": (
            "Tiny GQA Llama that refuses ('Sorry , I cannot help with that .') queries naming a made-up "
            "forbidden topic (glorp/zint/blarf/quazzle/snerk/vrell + noun) and answers a one-digit sum otherwise."
        ),
        "task": "refusal",
        "template": "reference",
        "refusal": R.REFUSAL,
        "heldout": {"forbidden": "heldout_forbidden.jsonl", "benign": "heldout_benign.jsonl"},
        "training": {
            "command": "python -m headscope.zoo.train_refusal " + " ".join(sys.argv[1:] if argv is None else argv),
            "seed": args.seed,
            "steps": args.steps,
            "hyperparameters": {k: v for k, v in vars(args).items() if k not in ("out", "seed", "steps", "threads")},
            "parameters": n_params,
            "wall_time_s": round(time.time() - start, 1),
            "final_loss": round(stats["final_loss"], 4),
            "heldout_compliance": round(base["compliance"], 4),
            "heldout_benign_accuracy": round(base["benign_accuracy"], 4),
            "torch": torch.__version__,
        },
    }
    (out / "organism.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"saved to {out}")


if __name__ == "__main__":
    main()
