"""Measure an organism's ground truth: the causal effect of ablating each head on its task.

    python -m headscope.zoo.ground_truth retrieval [--ablation zero] [--draws 10]

Writes ``ground_truth.csv`` (layer, head, accuracy, drop: needle accuracy with that head alone
ablated, and the drop from the unablated accuracy) and ``ground_truth.json`` (base accuracy, the
accuracy with the top-k heads of the ground truth ablated together, and k random other heads).
Nothing here uses an analyzer: it is the yardstick analyzers are checked against.
"""

from __future__ import annotations

import argparse
import json
import random

import pandas as pd
from headscope.progress import tqdm

from headscope import zoo
from headscope.analyzers.retrieval import needle_accuracy
from headscope.model import HeadModel
from headscope.io import write_whole
from headscope.tasks.needle import NeedleTask


def organism_trials(hm: HeadModel, name: str):
    grid = zoo.organism_info(name)["needle"]
    task = NeedleTask(hm.tokenizer, lengths=grid["lengths"], depths=grid["depths"], use_chat_template=False)
    return task.trials()


def measure(name: str = "retrieval", ablation: str = "zero", draws: int = 10, seed: int = 0, progress: bool = True):
    hm = HeadModel.load(name)
    trials = organism_trials(hm, name)

    def accuracy(heads) -> float:
        with hm.ablate(heads, mode=ablation):
            return float(needle_accuracy(hm, trials, progress=False)["correct"].mean())

    base = accuracy([])
    rows = []
    for layer, head in tqdm(hm.all_heads(), desc="single-head ablations", disable=not progress):
        acc = accuracy([(layer, head)])
        rows.append({"layer": layer, "head": head, "accuracy": acc, "drop": base - acc})
    table = pd.DataFrame(rows).sort_values("drop", ascending=False, kind="stable").reset_index(drop=True)
    ranked = [(int(r.layer), int(r.head)) for r in table.itertuples()]
    rng = random.Random(seed)
    sets = {}
    max_k = max(1, hm.geometry.n_total // 10)
    for k in range(1, max_k + 1):
        top = ranked[:k]
        others = [h for h in hm.all_heads() if h not in top]
        random_acc = [accuracy(rng.sample(others, k)) for _ in range(draws)]
        sets[str(k)] = {
            "top_heads": top,
            "top_accuracy": accuracy(top),
            "random_accuracy_mean": sum(random_acc) / len(random_acc),
            "random_accuracy": random_acc,
        }
    summary = {"organism": name, "ablation": ablation, "trials": len(trials), "base_accuracy": base, "top_k": sets}
    return table, summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?", default="retrieval")
    parser.add_argument("--ablation", choices=("zero", "uniform"), default="zero")
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    table, summary = measure(args.name, args.ablation, args.draws, args.seed)
    folder = zoo.organism_path(args.name)
    write_whole(folder / "ground_truth.csv", table.to_csv(index=False))
    write_whole(folder / "ground_truth.json", json.dumps(summary, indent=2) + "\n")
    print(table.head(10).to_string(index=False))
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "random_accuracy"} for k, v in summary["top_k"].items()}, indent=1))


if __name__ == "__main__":
    main()
