"""Soft injection on the icl organism against its controls, with 95 % bootstrap intervals.

    python benchmarks/soft_injection.py [--model icl] [--draws 20] [--repeats 3] [--timing-tasks 4] [--json benchmarks/soft_injection.json]
    python benchmarks/soft_injection.py --only-print --readme     # README table from the JSON

Per task (the organism's task files, seeded split), on every test query once (demonstrations from
the train split, never a test query):
- 0-shot, 1-shot and 10-shot ICL;
- 0-shot + soft injection with the learned alphas (Park & Rhee 2025: task embedding from 50 10-shot
  prompts, alphas fitted on 0-shot train prompts, best validation checkpoint);
- controls from the same embedding: the learned alphas permuted among the heads of each layer
  (``--draws`` draws: same per-layer strength, other heads); the best fixed layer rule (every head
  of a layer at alpha 1 or 0, the 2^L masks, the best chosen per task on the validation split);
  random alphas (uniform in [0, 1], ``--draws`` draws); the top ``--fv-top`` function-vector heads
  by causal indirect effect (Todd et al. 2024) at alpha 1; every head at alpha 1.
Intervals: 95 % bootstrap (``--boot`` resamples) of the mean over tasks, resampling the test
queries within each task; for the drawn controls, resampling the draws too (two-level: the interval
of the control's mean; the range of single draws is printed beside it). A method "beats" a control
only when its accuracy lies above the control's interval.

Also: Spearman of each task's alphas against the ground truth (-effect of zeroing the head on
10-shot accuracy), fitting time (embedding, alphas, function-vector scores alternated in each repeat,
best and median; the first repeat fits every task, later ones refit ``--timing-tasks`` of them) and
prompt cost (0-shot + injection against 10-shot ICL, alternated, the same tasks).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from headscope import zoo
from headscope.interventions.edits import intervene
from headscope.io import write_whole
from headscope.methods.soft_injection import fit_soft_selection, function_vector_heads, prompt_cost, task_embedding
from headscope.model import HeadModel
from headscope.scores import HeadScores
from headscope.tasks.icl import IclTask, PromptFormat, batches
from run_all import write_readme

BLOCK = "soft-injection"


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


@torch.no_grad()
def query_hits(hm, task: IclTask, k: int, edits=(), *, split: str = "test", seed: int = 0,
               batch_size: int = 50) -> torch.Tensor:
    """1/0 per query of ``split`` (each once; k demonstrations from the train split): is the greedy
    first answer token the target's?"""
    hits = []
    for batch in batches(hm.tokenizer, task.examples(split, k, seed=seed), PromptFormat(), batch_size):
        batch = batch.to(hm.device)
        position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp_min(0)
        with intervene(hm, edits):
            logits = hm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              position_ids=position_ids, logits_to_keep=1).logits[:, -1]
        hits.append((logits.argmax(-1) == batch.target).float().cpu())
    return torch.cat(hits)


def permuted_within_layers(alphas: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The same alphas, shuffled among the heads of each layer."""
    return torch.stack([row[torch.randperm(row.numel(), generator=gen)] for row in alphas])


def layer_masks(n_layers: int, n_heads: int) -> list[tuple[tuple[int, ...], torch.Tensor]]:
    """Every all-on / all-off layer rule (alpha 1 on every head of the chosen layers), none empty."""
    out = []
    for on in itertools.product((0, 1), repeat=n_layers):
        if any(on):
            out.append((on, torch.tensor(on, dtype=torch.float32)[:, None].expand(n_layers, n_heads).clone()))
    return out


def bootstrap(hits: list[list[torch.Tensor]], boot: int, seed: int = 0) -> tuple[float, float, float]:
    """Mean over draws and tasks of the accuracy, and its 95 % bootstrap interval. ``hits[d][t]``: the
    per-query hits of draw d on task t (one draw for a fixed method). Each resample draws the draws
    with replacement (when several), then the queries within each task and draw."""
    gen = torch.Generator().manual_seed(seed)
    n_draws, n_tasks = len(hits), len(hits[0])
    stacked = [torch.stack([hits[d][t] for d in range(n_draws)]) for t in range(n_tasks)]  # [draws, queries]
    point = statistics.mean(float(s.mean()) for s in stacked)
    draws = torch.randint(n_draws, (boot, n_draws), generator=gen)
    means = torch.zeros(boot)
    for s in stacked:
        queries = torch.randint(s.shape[1], (boot, n_draws, s.shape[1]), generator=gen)
        means += s[draws[:, :, None], queries].mean((1, 2))
    means /= n_tasks
    lo, hi = torch.quantile(means, torch.tensor([0.025, 0.975])).tolist()
    return point, lo, hi


def measure(args) -> dict:
    torch.set_num_threads(args.threads)
    hm = HeadModel.load(args.model)
    info = zoo.organism_info(args.model)
    folder = zoo.organism_path(args.model)
    tasks = [IclTask.load(folder / f) for f in info["task_files"]][: args.max_tasks]
    g = hm.geometry

    times = {"embedding": [], "fit_alphas": [], "fv_scores": []}
    embs, fvs = {}, {}
    for r in range(args.repeats):  # alternate the three steps within each repeat
        for task in tasks if r == 0 else tasks[: args.timing_tasks]:
            emb, t = _timed(lambda: task_embedding(hm, task, progress=False))
            times["embedding"].append(t)
            emb, t = _timed(lambda: fit_soft_selection(hm, task, emb, steps=args.fit_steps, progress=False))
            times["fit_alphas"].append(t)
            fv, t = _timed(lambda: function_vector_heads(hm, task, emb, progress=False))
            times["fv_scores"].append(t)
            if r == 0:
                embs[task.name], fvs[task.name] = emb, fv
            else:  # fitting is deterministic: every repeat learns the same alphas
                assert torch.equal(emb.alphas, embs[task.name].alphas)
        print(f"repeat {r + 1}/{args.repeats} fitted", flush=True)
    fit_time = {k: {"best_s": min(v), "median_s": statistics.median(v), "runs": len(v)} for k, v in times.items()}

    gen = torch.Generator().manual_seed(args.seed)
    masks = layer_masks(g.n_layers, g.n_heads)
    hits: dict[str, list[list[torch.Tensor]]] = {}
    best_rule, fv_heads = {}, {}
    methods = ["icl_0_shot", "icl_1_shot", "icl_10_shot", "injection", "permuted", "fixed_layer_rule", "random_alphas",
               "fv_top", "all_alpha_1"]
    for m in methods:
        hits[m] = [[] for _ in range(args.draws if m in ("permuted", "random_alphas") else 1)]
    for task in tasks:
        emb = embs[task.name]
        for k in (0, 1, 10):
            hits[f"icl_{k}_shot"][0].append(query_hits(hm, task, k, seed=args.seed))
        hits["injection"][0].append(query_hits(hm, task, 0, emb.edit()))
        for d in range(args.draws):
            hits["permuted"][d].append(query_hits(hm, task, 0, emb.edit(permuted_within_layers(emb.alphas, gen))))
            hits["random_alphas"][d].append(query_hits(hm, task, 0, emb.edit(torch.rand(g.n_layers, g.n_heads,
                                                                                          generator=gen))))
        val = [(float(query_hits(hm, task, 0, emb.edit(mask), split="val").mean()), on) for on, mask in masks]
        score, on = max(val, key=lambda v: v[0])  # first best on ties (fewest high layers on)
        best_rule[task.name] = {"layers_on": [l for l, bit in enumerate(on) if bit], "val_accuracy": score}
        hits["fixed_layer_rule"][0].append(query_hits(hm, task, 0, emb.edit(masks[[m[0] for m in masks].index(on)][1])))
        fv_heads[task.name] = fvs[task.name].top(args.fv_top)
        hits["fv_top"][0].append(query_hits(hm, task, 0, emb.edit(heads=fv_heads[task.name])))
        hits["all_alpha_1"][0].append(query_hits(hm, task, 0, emb.edit(1.0)))
        print(f"{task.name} measured", flush=True)

    table = {}
    for m in methods:
        point, lo, hi = bootstrap(hits[m], args.boot, args.seed)
        per_task = [statistics.mean(float(hits[m][d][t].mean()) for d in range(len(hits[m]))) for t in range(len(tasks))]
        entry = {"mean": point, "ci95": [lo, hi], "draws": len(hits[m]),
                 "per_task": {t.name: a for t, a in zip(tasks, per_task)}}
        if len(hits[m]) > 1:
            draw_means = [statistics.mean(float(h.mean()) for h in draw) for draw in hits[m]]
            entry["draw_range"] = [min(draw_means), max(draw_means)]
        table[m] = entry

    cost = {}
    for r in range(args.repeats):  # alternate 0-shot + injection and 10-shot ICL
        for task in tasks if r == 0 else tasks[: args.timing_tasks]:
            for name, k, edits in (("zero_shot_injection", 0, embs[task.name].edit()), ("icl_10_shot", 10, ())):
                c = prompt_cost(hm, task, k, edits=edits, repeats=1)
                entry = cost.setdefault(name, {"tokens": [], "seconds": []})
                entry["seconds"].append(c["seconds"])
                if r == 0:
                    entry["tokens"].append(c["tokens"])
    cost = {n: {"tokens_per_query": statistics.mean(v["tokens"]), "best_s_per_query": min(v["seconds"]),
                "median_s_per_query": statistics.median(v["seconds"])} for n, v in cost.items()}

    verdict = judge(table)
    return {
        "model": args.model, "geometry": [g.n_layers, g.n_heads, g.head_dim], "tasks": [t.name for t in tasks],
        "test_queries_per_task": [len(t["test"]) for t in tasks], "draws": args.draws, "bootstrap": args.boot,
        "seed": args.seed, "fv_top": args.fv_top, "fit_steps": args.fit_steps, "accuracy": table, "verdict": verdict,
        "fixed_layer_rule": best_rule, "fv_top_heads": fv_heads,
        "fv_cie": {t: fvs[t].scores.tolist() for t in fvs},
        "alphas": {t: embs[t].alphas.tolist() for t in embs}, "mean_alpha": {t: float(embs[t].alphas.mean()) for t in embs},
        "best_val_step": {t: embs[t].meta["best_step"] for t in embs},
        "fit_time_per_task": fit_time, "prompt_cost": cost,
        "threads": args.threads, "loadavg": os.getloadavg(), "torch": torch.__version__,
    }


LABELS = {
    "icl_0_shot": "0-shot",
    "icl_1_shot": "1-shot ICL",
    "icl_10_shot": "10-shot ICL",
    "injection": "0-shot + soft injection, learned alphas",
    "permuted": "learned alphas permuted within each layer",
    "fixed_layer_rule": "best fixed layer rule (each layer's heads all at 1 or all at 0, chosen on validation)",
    "random_alphas": "random alphas, uniform in [0, 1]",
    "fv_top": "top-{k} function-vector heads (CIE, Todd et al. 2024), alpha 1",
    "all_alpha_1": "every head, alpha 1",
}


CONTROLS = ("permuted", "fixed_layer_rule", "random_alphas")


def judge(table: dict) -> dict:
    """The paper's claim and the rule for reading the alphas, from the accuracy table: the injection
    is "above" a control when its mean lies above the control's 95 % interval; "apart" when even its
    own interval does."""
    inj, icl10 = table["injection"], table["icl_10_shot"]
    verdict = {"injection_minus_10_shot_points": round(100 * (inj["mean"] - icl10["mean"]), 1),
               "paper_claim_points": [10.2, 14.3]}
    for name in CONTROLS:
        verdict[f"above_{name}"] = inj["mean"] > table[name]["ci95"][1]
        verdict[f"apart_from_{name}"] = inj["ci95"][0] > table[name]["ci95"][1]
    verdict["alphas_readable_as_task_heads"] = verdict["above_permuted"] and verdict["above_fixed_layer_rule"]
    return verdict


def spearman_vs_truth(result: dict) -> dict:
    """Per task, Spearman of the learned alphas and of the function-vector CIE against the organism's
    ground truth (-effect of zeroing the head on 10-shot accuracy), read now from ground_truth.csv."""
    truth_path = zoo.ground_truth_path(result["model"])
    truth = pd.read_csv(truth_path) if truth_path else pd.DataFrame()
    out = {}
    for name in result["tasks"]:
        if f"effect_{name}" not in truth.columns:
            print(f"no ground truth effect_{name}: no Spearman for it", file=sys.stderr)
            continue
        effect = torch.zeros(*result["geometry"][:2])
        for row in truth.itertuples():
            effect[row.layer, row.head] = -getattr(row, f"effect_{name}")
        gt = HeadScores(effect, "ground truth")
        out[name] = {"alphas": HeadScores(torch.tensor(result["alphas"][name]), "alpha").compare(gt, k=4)["spearman"],
                     "fv_cie": HeadScores(torch.tensor(result["fv_cie"][name]), "cie").compare(gt, k=4)["spearman"]}
    return out


def readme_block(result: dict) -> str:
    """The README's table and verdict, from the benchmark's JSON."""
    acc, v = result["accuracy"], judge(result["accuracy"])
    lines = ["| 0-shot prompt unless said, test accuracy (mean of the tasks) | mean | 95 % interval | draws |",
             "|---|---|---|---|"]
    for m, label in LABELS.items():
        e = acc[m]
        extra = f" (draws {e['draw_range'][0]:.3f}-{e['draw_range'][1]:.3f})" if "draw_range" in e else ""
        bold = "**" if m in ("icl_10_shot", "injection") else ""
        lines.append(f"| {label.format(k=result['fv_top'])} | {bold}{e['mean']:.3f}{bold} | "
                     f"{e['ci95'][0]:.3f}-{e['ci95'][1]:.3f}{extra} | {e['draws']} |")
    cost = result["prompt_cost"]
    inj, icl = cost["zero_shot_injection"], cost["icl_10_shot"]
    claim = "reproduced" if v["injection_minus_10_shot_points"] >= 10 else "not reproduced"
    def beats(name):
        above = "above" if v[f"above_{name}"] else "not above"
        gap = 100 * (acc["injection"]["mean"] - acc[name]["mean"])
        apart = "the intervals apart" if v[f"apart_from_{name}"] else "the two intervals overlap"
        return f"{above} the {name.replace('_', ' ')} control's interval ({gap:+.1f} points; {apart})"

    lines += ["", f"{len(result['tasks'])} tasks, {min(result['test_queries_per_task'])} test queries each "
              f"(each once); intervals: {result['bootstrap']} bootstrap resamples of the queries within each task "
              f"(and of the {result['draws']} draws for the drawn controls); seed {result['seed']}; "
              f"1-minute load average {result['loadavg'][0]:.1f} at the end.",
              "",
              f"- The paper's claim, soft injection +{v['paper_claim_points'][0]} to +{v['paper_claim_points'][1]} "
              f"points over 10-shot ICL: **{claim}** here ({v['injection_minus_10_shot_points']:+.1f} points).",
              f"- Learned alphas: {beats('permuted')}, {beats('fixed_layer_rule')}, {beats('random_alphas')}. By the "
              "rule set beforehand (above the permuted and the fixed-rule intervals) the alphas "
              + ("**can** be read as task-relevant heads beyond their per-layer strength"
                 + ("." if v["apart_from_permuted"] and v["apart_from_fixed_layer_rule"] else
                    ", narrowly: the injection's own interval overlaps a control's.")
                 if v["alphas_readable_as_task_heads"] else
                 "**cannot** be read as task-relevant heads: a control that keeps less of them does as well."),
              f"- Prompt cost: 0-shot + injection {inj['tokens_per_query']:.0f} tokens, "
              f"{inj['best_s_per_query'] * 1000:.1f} ms per query best ({inj['median_s_per_query'] * 1000:.1f} ms median); "
              f"10-shot ICL {icl['tokens_per_query']:.0f} tokens, {icl['best_s_per_query'] * 1000:.1f} ms "
              f"({icl['median_s_per_query'] * 1000:.1f} ms); one query at a time, one thread.",
              ]
    ft = result["fit_time_per_task"]
    lines.append(f"- Fitting per task (one thread, {ft['fit_alphas']['runs']} runs alternated): task embedding "
                 f"{ft['embedding']['best_s']:.2f} s best ({ft['embedding']['median_s']:.2f} s median), {result['fit_steps']} alpha "
                 f"steps {ft['fit_alphas']['best_s']:.1f} s ({ft['fit_alphas']['median_s']:.1f} s), function-vector "
                 f"CIE {ft['fv_scores']['best_s']:.1f} s ({ft['fv_scores']['median_s']:.1f} s).")
    rho = [s["alphas"] for s in result["spearman_vs_ground_truth"].values()]
    rho_fv = [s["fv_cie"] for s in result["spearman_vs_ground_truth"].values()]
    rho, rho_fv = [r for r in rho if r == r], [r for r in rho_fv if r == r]  # NaN: constant alphas or truth
    if rho and rho_fv:
        lines.append(f"- Spearman against the ablation ground truth, per task: alphas {min(rho):.2f} to {max(rho):.2f} "
                     f"(mean {statistics.mean(rho):.2f}, {len(rho)} tasks with a defined value); function-vector CIE "
                     f"{min(rho_fv):.2f} to {max(rho_fv):.2f} (mean {statistics.mean(rho_fv):.2f}, {len(rho_fv)} tasks).")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="icl")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats of the fitting and the prompt cost")
    parser.add_argument("--timing-tasks", type=int, default=4,
                        help="tasks timed again in repeats after the first (the first fits every task)")
    parser.add_argument("--draws", type=int, default=20, help="draws of the permuted and random-alpha controls")
    parser.add_argument("--boot", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fv-top", type=int, default=3, help="heads injected by the function-vector baseline")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fit-steps", type=int, default=400, help="alpha fitting steps (the paper's 400)")
    parser.add_argument("--max-tasks", type=int, default=None, help="only the first N tasks (quick checks)")
    parser.add_argument("--json", default="benchmarks/soft_injection.json")
    parser.add_argument("--only-print", action="store_true", help="print the table from the existing JSON")
    parser.add_argument("--readme", action="store_true", help="write the table into README.md")
    args = parser.parse_args(argv)
    if args.only_print:
        result = json.loads(Path(args.json).read_text())
    else:
        result = measure(args)
    result["spearman_vs_ground_truth"] = spearman_vs_truth(result)
    result["verdict"] = judge(result["accuracy"])
    write_whole(Path(args.json), json.dumps(result, indent=2) + "\n")
    block = readme_block(result)
    print(f"<!-- bench:{BLOCK} -->\n{block}\n<!-- bench:{BLOCK}:end -->")
    if args.readme:
        write_readme({BLOCK: block})
    return 0


if __name__ == "__main__":
    sys.exit(main())
