"""Soft injection on the icl organism: accuracy, fitting time, prompt cost, alphas vs ground truth.

    python benchmarks/soft_injection.py [--model icl] [--repeats 3] [--queries 200] [--json benchmarks/soft_injection.json]

Per task (the organism's task files, seeded split): test accuracy of 0-shot, 10-shot ICL, 0-shot +
soft injection (Park & Rhee 2025), and the baselines from the same embedding (top function-vector
heads by causal indirect effect, Todd et al. 2024, at alpha 1; every head at alpha 1; every head at
the mean learned alpha). Timing: embedding, alpha fitting and function-vector scoring, alternated in
each repeat; best and median; 0-shot + injection against 10-shot ICL per query. Also: Spearman of
each task's alphas against the measured ground truth (-effect of zeroing the head on 10-shot
accuracy), and top-head overlap between tasks of one family (shared mechanism) and across families.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from headscope import zoo
from headscope.analyzers.circuits import overlap
from headscope.methods.soft_injection import (compare_methods, fit_soft_selection, function_vector_heads,
                                                    prompt_cost, task_embedding)
from headscope.io import write_whole
from headscope.model import HeadModel
from headscope.scores import HeadScores
from headscope.tasks.icl import IclTask


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="icl")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--queries", type=int, default=200, help="test queries per task (drawn with replacement)")
    parser.add_argument("--fv-top", type=int, default=3, help="heads injected by the function-vector baseline")
    parser.add_argument("--overlap-top", type=int, default=4, help="top heads per task compared across tasks")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default="benchmarks/soft_injection.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    hm = HeadModel.load(args.model)
    info = zoo.organism_info(args.model)
    folder = zoo.organism_path(args.model)
    tasks = [IclTask.load(folder / f) for f in info["task_files"]]
    g = hm.geometry

    times = {"embedding": [], "fit_alphas": [], "fv_scores": []}
    embs, fvs = {}, {}
    for r in range(args.repeats):  # alternate the three steps within each repeat
        for task in tasks:
            emb, t = _timed(lambda: task_embedding(hm, task, progress=False))
            times["embedding"].append(t)
            emb, t = _timed(lambda: fit_soft_selection(hm, task, emb, progress=False))
            times["fit_alphas"].append(t)
            fv, t = _timed(lambda: function_vector_heads(hm, task, emb, progress=False))
            times["fv_scores"].append(t)
            if r == 0:
                embs[task.name], fvs[task.name] = emb, fv
            else:  # fitting is deterministic: every repeat learns the same alphas
                assert torch.equal(emb.alphas, embs[task.name].alphas)
    per_task_time = {k: {"best_s": min(v), "median_s": statistics.median(v), "runs": len(v)} for k, v in times.items()}

    truth = pd.read_csv(folder / "ground_truth.csv")
    accuracy, spearman = {}, {}
    for task in tasks:
        accuracy[task.name] = compare_methods(hm, task, embs[task.name], fv_top=args.fv_top, fv_scores=fvs[task.name],
                                              n=args.queries)
        effect = torch.zeros(g.n_layers, g.n_heads)
        for row in truth.itertuples():
            effect[row.layer, row.head] = -getattr(row, f"effect_{task.name}")
        spearman[task.name] = {
            "alphas": embs[task.name].scores().compare(HeadScores(effect, "ground truth"), k=args.overlap_top)["spearman"],
            "fv_cie": fvs[task.name].compare(HeadScores(effect, "ground truth"), k=args.overlap_top)["spearman"],
        }
    methods = list(next(iter(accuracy.values())))
    accuracy["mean"] = {m: sum(accuracy[t.name][m] for t in tasks) / len(tasks) for m in methods}

    families = info.get("families", {})
    pairs = []
    for a, b in itertools.combinations([t.name for t in tasks], 2):
        o = overlap(embs[a].scores().top(args.overlap_top), embs[b].scores().top(args.overlap_top))
        same = families.get(a) is not None and families.get(a) == families.get(b)
        pairs.append({"tasks": [a, b], "same_family": same, "jaccard": o["jaccard"], "shared": o["shared"]})
    same = [p["jaccard"] for p in pairs if p["same_family"]]
    cross = [p["jaccard"] for p in pairs if not p["same_family"]]

    cost = {}
    for r in range(args.repeats):  # alternate 0-shot + injection and 10-shot ICL
        for task in tasks:
            for name, k, edits in (("zero_shot_injection", 0, embs[task.name].edit()), ("icl_10_shot", 10, ())):
                c = prompt_cost(hm, task, k, edits=edits, repeats=1)
                entry = cost.setdefault(name, {"tokens": [], "seconds": []})
                entry["seconds"].append(c["seconds"])
                if r == 0:
                    entry["tokens"].append(c["tokens"])
    cost = {n: {"tokens_per_query": statistics.mean(v["tokens"]), "best_s_per_query": min(v["seconds"]),
                "median_s_per_query": statistics.median(v["seconds"])} for n, v in cost.items()}

    result = {
        "model": args.model, "geometry": [g.n_layers, g.n_heads, g.head_dim], "queries_per_task": args.queries,
        "accuracy": accuracy, "spearman_vs_ground_truth": spearman,
        "alphas": {t: embs[t].alphas.tolist() for t in embs}, "mean_alpha": {t: float(embs[t].alphas.mean()) for t in embs},
        "best_val_step": {t: embs[t].meta["best_step"] for t in embs},
        "fv_top_heads": {t: fvs[t].top(args.fv_top) for t in fvs},
        "overlap_top": args.overlap_top, "overlap_pairs": pairs,
        "overlap_same_family_mean_jaccard": statistics.mean(same) if same else None,
        "overlap_cross_family_mean_jaccard": statistics.mean(cross) if cross else None,
        "fit_time_per_task": per_task_time, "prompt_cost": cost,
        "threads": args.threads, "loadavg": os.getloadavg(), "torch": torch.__version__,
    }
    text = json.dumps(result, indent=2) + "\n"
    write_whole(Path(args.json), text)
    print(pd.DataFrame(accuracy).T.to_string(float_format=lambda x: f"{x:.3f}"))
    print("spearman vs ground truth:", json.dumps(spearman))
    print(f"top-{args.overlap_top} overlap (Jaccard): same family {result['overlap_same_family_mean_jaccard']}, "
          f"across {result['overlap_cross_family_mean_jaccard']}")
    print("fit time per task:", json.dumps(per_task_time))
    print("prompt cost:", json.dumps(cost))
    print("load average:", os.getloadavg())
    return 0


if __name__ == "__main__":
    sys.exit(main())
