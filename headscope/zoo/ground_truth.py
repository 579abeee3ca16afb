"""Measure an organism's ground truth: the causal effect of ablating each head on its task.

    python -m headscope.zoo.ground_truth retrieval [--ablation zero] [--draws 10]
    python -m headscope.zoo.ground_truth icl         # per-head effects on 10-shot accuracy (icl_ground_truth)

Writes ``ground_truth.csv`` (layer, head, accuracy, drop: needle accuracy with that head alone
ablated, and the drop from the unablated accuracy) and ``ground_truth.json`` (base accuracy, the
accuracy with the top-k heads of the ground truth ablated together, and k random other heads).
Nothing here uses an analyzer: it is the yardstick analyzers are checked against.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import pandas as pd
import torch
from headscope.progress import tqdm

from headscope import zoo
from headscope.analyzers.retrieval import needle_accuracy
from headscope.methods.soft_injection import accuracy
from headscope.model import HeadModel
from headscope.io import write_whole
from headscope.tasks.icl import IclTask
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


@torch.no_grad()
def icl_ground_truth(folder, *, k: int = 10, n: int | None = None, seed: int = 0, progress: bool = True) -> Path:
    """``ground_truth.csv`` of the icl organism: per head and task, k-shot accuracy on ``n`` test
    queries drawn with replacement (None: every test query once; demonstrations from the train split)
    with the head's output zeroed minus without (negative = the head helps), and the mean over tasks.
    Also records the organism's 0 / 1 / k-shot accuracy on every test query in ``organism.json``."""
    folder = Path(folder)
    hm = HeadModel.load(str(folder))
    info = json.loads((folder / "organism.json").read_text())
    tasks = [IclTask.load(folder / f) for f in info["task_files"]]
    base = {t.name: accuracy(hm, t, k, n=n, seed=seed, batch_size=50) for t in tasks}
    rows = []
    for layer, head in tqdm(hm.all_heads(), desc="ground truth", disable=not progress):
        row = {"layer": layer, "head": head}
        with hm.ablate([(layer, head)]):
            for t in tasks:
                row[f"effect_{t.name}"] = round(accuracy(hm, t, k, n=n, seed=seed, batch_size=50) - base[t.name], 4)
        row["effect"] = round(sum(row[f"effect_{t.name}"] for t in tasks) / len(tasks), 4)
        rows.append(row)
    path = folder / "ground_truth.csv"
    write_whole(path, pd.DataFrame(rows).to_csv(index=False))
    record = info.setdefault("training", {})
    for shots in sorted({0, 1, k}):
        acc = {t.name: accuracy(hm, t, shots, seed=seed, batch_size=50) for t in tasks}
        record[f"accuracy_{shots}_shot"] = {name: round(a, 4) for name, a in acc.items()}
        record[f"accuracy_{shots}_shot_mean"] = round(sum(acc.values()) / len(acc), 4)
    queries = "every test query once" if n is None else f"{n} test queries per task drawn with replacement"
    info["ground_truth"] = (f"effect of zeroing each head alone on {k}-shot accuracy ({queries}, demonstrations "
                            f"from the train split, seed {seed})")
    write_whole(folder / "organism.json", json.dumps(info, indent=2) + "\n")
    print(f"{k}-shot accuracy:", record[f"accuracy_{k}_shot"], " 0-shot:", record["accuracy_0_shot"])
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?", default="retrieval")
    parser.add_argument("--ablation", choices=("zero", "uniform"), default="zero")
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.name == "icl":
        icl_ground_truth(zoo.organism_path("icl"), seed=args.seed)
        return
    table, summary = measure(args.name, args.ablation, args.draws, args.seed)
    folder = zoo.organism_path(args.name)
    write_whole(folder / "ground_truth.csv", table.to_csv(index=False))
    write_whole(folder / "ground_truth.json", json.dumps(summary, indent=2) + "\n")
    print(table.head(10).to_string(index=False))
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "random_accuracy"} for k, v in summary["top_k"].items()}, indent=1))


if __name__ == "__main__":
    main()

