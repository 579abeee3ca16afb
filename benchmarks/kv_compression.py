"""Head-wise KV-cache compression: needle accuracy against KV bytes held, and memory / decode speed.

    python benchmarks/kv_compression.py accuracy [--draws 20]   -> benchmarks/kv_accuracy.json
    python benchmarks/kv_compression.py memory [--lengths 8192,16384,32768]  -> benchmarks/kv_memory.json
    python benchmarks/kv_compression.py readme                 # rows into README (<!-- bench:kv-... --> markers)

accuracy: the retrieval organism at its longest needle context, sink 4, recent 64; full-head
shares 0, 1/8, 1/4, 1/2, 1 of the KV heads chosen by the retrieval ranking (headscope's needle
score, teacher-forced), by RazorAttention's data-free rule (echo / induction on repeated random
tokens), and at random (the same count per layer as the retrieval choice; 20 draws, mean and 95 %
bootstrap interval). Share 0 is every head streaming (StreamingLLM). Bytes: every tensor of the
cache, per sequence, at the end of the longest trial.

memory: a random-init Llama-shaped model (GQA), prompt of N tokens, 32 greedy decode steps, each
run in its own process (peak RSS): plain SDPA generate with the full DynamicCache against 25 % full
KV heads (duo, sink 4, recent 64); alternated, best and median, 1-minute load average.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from timing import load_average, summary  # noqa: E402

from headscope.controls import bootstrap_interval  # noqa: E402

SHARES = (0.0, 0.125, 0.25, 0.5, 1.0)


# ------------------------------------------------------------------------------- accuracy
def accuracy(args) -> dict:
    from headscope.analyzers.retrieval import needle_accuracy, retrieval_heads
    from headscope.interventions.kinds import kv_compress as kvc
    from headscope.model import HeadModel
    from headscope.tasks.needle import NeedleTask
    from headscope import zoo

    torch.manual_seed(0)
    hm = HeadModel.load("retrieval")
    g = hm.geometry
    grid = zoo.organism_info("retrieval")["needle"]
    task = lambda lengths: NeedleTask(hm.tokenizer, lengths=lengths, depths=grid["depths"],  # noqa: E731
                                      use_chat_template=False, max_positions=g.max_positions).trials()
    longest = max(grid["lengths"])
    trials = task([longest])
    t0 = time.perf_counter()
    ranking = retrieval_heads(hm, task(grid["lengths"]), progress=False).scores  # the organism's own grid
    razor = kvc.razor_scores(hm, seed=0).scores
    print(f"scored in {time.perf_counter() - t0:.0f} s", flush=True)

    def run(full: torch.Tensor | None) -> dict:
        if full is None:
            acc = float(needle_accuracy(hm, trials, progress=False)["correct"].mean())
            n = max(len(t.prompt_ids) for t in trials)
            return {"accuracy": acc, "kv_bytes_held": None, "tokens": n}
        with kvc.compress(hm, full, sink=args.sink, recent=args.recent) as state:
            acc = float(needle_accuracy(hm, trials, progress=False)["correct"].mean())
        return {"accuracy": acc, **state.longest, "full": full.int().tolist()}

    t0 = time.perf_counter()
    baseline = run(None)
    report = {"length": longest, "trials": len(trials), "sink": args.sink, "recent": args.recent,
              "kv_heads": g.n_layers * g.n_kv_heads, "full_cache": baseline, "load_1m": [load_average()], "shares": []}
    print(f"full cache: accuracy {baseline['accuracy']:.3f} ({time.perf_counter() - t0:.1f} s)", flush=True)
    rng = random.Random(args.seed)
    for share in SHARES:
        row = {"share": share}
        full_r = kvc.full_heads_from_scores(ranking, g.n_kv_heads, share, "any")
        row["retrieval"] = run(full_r)
        row["razor"] = run(kvc.full_heads_from_scores(razor, g.n_kv_heads, share, "any"))
        if 0 < int(full_r.sum()) < full_r.numel():
            draws = [run(kvc.random_full_heads(full_r, rng)) for _ in range(args.draws)]
            accs = [d["accuracy"] for d in draws]
            row["random"] = {**control_summary(accs, args.seed), "draws": accs,
                             "kv_bytes_held": draws[0]["kv_bytes_held"]}
            draws = [run(kvc.random_full_heads(full_r, rng, per_layer=False)) for _ in range(args.draws)]
            accs = [d["accuracy"] for d in draws]
            row["random_any_layer"] = {**control_summary(accs, args.seed), "draws": accs,
                                       "kv_bytes_held": [d["kv_bytes_held"] for d in draws]}
        report["shares"].append(row)
        print(json.dumps({k: (v if k == "share" else {kk: vv for kk, vv in v.items() if kk not in ("full", "draws")})
                          for k, v in row.items()}), flush=True)
    report["load_1m"].append(load_average())
    report["ranking_top_kv"] = kvc.full_heads_from_scores(ranking, g.n_kv_heads, 0.25, "any").int().tolist()
    report["claim"] = claim(report)
    return report


def control_summary(accs: list[float], seed: int = 0) -> dict:
    """Mean and 95 % bootstrap interval of a random control's draws (headscope.controls)."""
    lo, hi = bootstrap_interval(accs, seed=seed)
    return {"mean": sum(accs) / len(accs), "lo": lo, "hi": hi}


def resummarise(report: dict) -> dict:
    """Every random control's mean and interval again from its stored draws, and the claim from them."""
    for row in report["shares"]:
        for key in ("random", "random_any_layer"):
            if key in row:
                row[key].update(control_summary(row[key]["draws"]))
    report["claim"] = claim(report)
    return report


def claim(report: dict) -> dict:
    """Shares where the retrieval choice keeps >= 95 % of full-cache accuracy and random heads
    (the upper end of their interval) do not."""
    target = 0.95 * report["full_cache"]["accuracy"]
    out = {"target": target, "retrieval_keeps": [], "random_keeps": [], "retrieval_only": [],
           "retrieval_only_any_layer": [], "retrieval_above_random": [], "retrieval_above_random_any_layer": []}
    for row in report["shares"]:
        r = row["retrieval"]["accuracy"]
        if r >= target:
            out["retrieval_keeps"].append(row["share"])
        for key, suffix in (("random", ""), ("random_any_layer", "_any_layer")):
            if key not in row:
                continue
            if key == "random" and row[key]["mean"] >= target:
                out["random_keeps"].append(row["share"])
            if r >= target and row[key]["hi"] < target:
                out["retrieval_only" + suffix].append(row["share"])
            if r > row[key]["hi"]:
                out["retrieval_above_random" + suffix].append(row["share"])
    return out


# ------------------------------------------------------------------------------- memory / speed
CHILD = r"""
import json, resource, sys, time, torch
import transformers as tf
sys.path.insert(0, {src!r})
torch.set_num_threads({threads})
torch.manual_seed(0)
cfg = tf.LlamaConfig(hidden_size={hidden}, num_hidden_layers={layers}, num_attention_heads={heads},
                     num_key_value_heads={kv}, intermediate_size={inter}, vocab_size=1024,
                     max_position_embeddings={n} + 64)
model = tf.LlamaForCausalLM(cfg).eval()
model.set_attn_implementation("sdpa")
ids = torch.randint(3, 1024, (1, {n}), generator=torch.Generator().manual_seed(1))
from headscope.model import HeadModel
from headscope.interventions.kinds import kv_compress as kvc
hm = HeadModel(model)
new = {new}
with torch.no_grad():
    if {method!r} == "sdpa":
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        t1 = time.perf_counter()
        cache = out.cache
        tok = out.logits[:, -1:].argmax(-1)
        for _ in range(new):
            out = model(tok, cache=cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
        t2 = time.perf_counter()
        held = sum(l.keys.numel() * l.keys.element_size() * 2 for l in cache.layers)
    else:
        full = kvc.full_heads_from_scores(torch.rand({layers}, {kv}, generator=torch.Generator().manual_seed(2)), {kv}, {share})
        with kvc.compress(hm, full, sink=4, recent=64) as state:
            t0 = time.perf_counter()
            out = model(ids)
            t1 = time.perf_counter()
            cache = state.cache
            tok = out.logits[:, -1:].argmax(-1)
            for _ in range(new):
                out = model(tok, cache=cache)
                tok = out.logits[:, -1:].argmax(-1)
            t2 = time.perf_counter()
            held = cache.nbytes()
print(json.dumps({{"prefill_s": t1 - t0, "decode_s": t2 - t1, "decode_tok_s": new / (t2 - t1), "kv_bytes": held,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def memory(args) -> dict:
    shape = dict(hidden=256, layers=4, heads=4, kv=2, inter=512)  # head_dim 64, GQA 2:1
    results = []
    for n in args.lengths:
        runs = {"sdpa": [], "kv_duo_25": []}
        load_before = load_average()
        for _ in range(args.repeats):
            for method in runs:
                code = CHILD.format(src=str(HERE.parent), threads=args.threads, n=n, new=args.new, method=method,
                                    share=0.25, **shape)
                proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                      env={**os.environ, "HF_HUB_OFFLINE": "1"})
                if proc.returncode:
                    raise RuntimeError(proc.stderr[-2000:])
                runs[method].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        row = {"length": n, "repeats": args.repeats, "load_1m": [load_before, load_average()], "methods": {}}
        for method, rs in runs.items():
            row["methods"][method] = {
                "kv_bytes": rs[0]["kv_bytes"],
                "peak_rss_mb": sorted(r["peak_rss_mb"] for r in rs)[len(rs) // 2],
                "decode": summary([r["decode_s"] for r in rs]),
                "prefill": summary([r["prefill_s"] for r in rs]),
                "decode_tok_s_best": args.new / min(r["decode_s"] for r in rs),
                "decode_tok_s_median": args.new / sorted(r["decode_s"] for r in rs)[len(rs) // 2],
            }
        m = row["methods"]
        row["kv_ratio"] = m["kv_duo_25"]["kv_bytes"] / m["sdpa"]["kv_bytes"]
        row["decode_speedup_best"] = m["sdpa"]["decode"]["best_s"] / m["kv_duo_25"]["decode"]["best_s"]
        row["decode_speedup_median"] = m["sdpa"]["decode"]["median_s"] / m["kv_duo_25"]["decode"]["median_s"]
        results.append(row)
        print(json.dumps(row), flush=True)
    return {"shape": shape, "new_tokens": args.new, "threads": args.threads, "results": results}


# ------------------------------------------------------------------------------- README rows
def accuracy_rows(report: dict) -> str:
    def kb(b):
        return f"{b / 1024:.1f} KiB"

    def rand(r):
        return f"{r['mean']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}]" if r else "(no choice)"

    lines = ["| full KV heads | retrieval ranking | data-free (RazorAttention) | random, same count per layer | "
             "random, any layer | KV held |", "|---|---|---|---|---|---|"]
    for row in report["shares"]:
        n = round(row["share"] * report["kv_heads"])
        label = f"{row['share']:g} ({n} of {report['kv_heads']})" + (" = all streaming" if n == 0 else "")
        lines.append(f"| {label} | {row['retrieval']['accuracy']:.3f} | {row['razor']['accuracy']:.3f} | "
                     f"{rand(row.get('random'))} | {rand(row.get('random_any_layer'))} | "
                     f"{kb(row['retrieval']['kv_bytes_held'])} of {kb(row['retrieval']['kv_bytes_full'])} |")
    c = report["claim"]
    lines.append("")
    lines.append(f"Retrieval organism, {report['trials']} needle trials at {report['length']} tokens, sink "
                 f"{report['sink']}, recent {report['recent']}; full cache accuracy "
                 f"{report['full_cache']['accuracy']:.3f} (95 % of it: {c['target']:.3f}); random heads: "
                 f"{len(report['shares'][1].get('random', {}).get('draws', []))} draws each, mean [95 % bootstrap "
                 f"interval], the same count per layer as the retrieval choice, or the same total count from any "
                 f"layer; KV held: every tensor of the cache per sequence at the end of the longest trial; load "
                 f"{report['load_1m'][0]:.2f}-{report['load_1m'][-1]:.2f}. Shares where the retrieval ranking keeps "
                 f">= 95 % of full-cache accuracy: {c['retrieval_keeps'] or 'none'}; of those, where random heads do "
                 f"not (upper end of their interval below 95 %): same count per layer {c['retrieval_only'] or 'none'}, "
                 f"any layer {c['retrieval_only_any_layer'] or 'none'}. Retrieval above the random interval: same "
                 f"count per layer {c['retrieval_above_random'] or 'none'}, any layer "
                 f"{c['retrieval_above_random_any_layer'] or 'none'}.")
    holds = bool(c["retrieval_only"] or c["retrieval_only_any_layer"])
    lines.append(f"The claim that the retrieval ranking keeps >= 95 % of full-cache accuracy at a share where random "
                 f"heads do not: {'holds' if holds else 'not borne out here'}.")
    return "\n".join(lines)


def memory_rows(report: dict) -> str:
    s = report["shape"]
    lines = ["| tokens | KV bytes, full / 25 % full heads | ratio | peak RSS, full / 25 % | decode tok/s, full / 25 % "
             "(best; median) | decode speed-up, best (median) |", "|---|---|---|---|---|---|"]
    for r in report["results"]:
        a, b = r["methods"]["sdpa"], r["methods"]["kv_duo_25"]
        lines.append(f"| {r['length'] // 1024}K | {a['kv_bytes'] / 2**20:.1f} / {b['kv_bytes'] / 2**20:.1f} MiB | "
                     f"{r['kv_ratio']:.3f}x | {a['peak_rss_mb']:.0f} / {b['peak_rss_mb']:.0f} MB | "
                     f"{a['decode_tok_s_best']:.1f} / {b['decode_tok_s_best']:.1f} "
                     f"({a['decode_tok_s_median']:.1f} / {b['decode_tok_s_median']:.1f}) | "
                     f"{r['decode_speedup_best']:.2f}x ({r['decode_speedup_median']:.2f}x) |")
    loads = [v for r in report["results"] for v in r["load_1m"]]
    lines.append("")
    lines.append(f"Random-init Llama-shaped model ({s['layers']} layers, {s['heads']} query / {s['kv']} KV heads, "
                 f"head_dim {s['hidden'] // s['heads']}, float32), {report['new_tokens']} greedy decode steps, "
                 f"{report['threads']} thread(s); plain SDPA with the full cache against duo with 25 % full KV heads, "
                 f"sink 4, recent 64; each run its own process, {report['results'][0]['repeats']} alternated runs; "
                 f"1-minute load average {min(loads):.2f}-{max(loads):.2f}.")
    last = max(report["results"], key=lambda r: r["length"])
    met = last["kv_ratio"] <= 0.35 and last["decode_speedup_best"] >= 1 and last["decode_speedup_median"] >= 1
    lines.append(f"Goal at {last['length'] // 1024}K (25 % full heads: <= 0.35x the full cache's KV bytes, decode no "
                 f"slower): {'met' if met else 'not met'}, {last['kv_ratio']:.3f}x the bytes, decode "
                 f"{last['decode_speedup_best']:.2f}x (median {last['decode_speedup_median']:.2f}x) the full cache's "
                 f"speed. Peak RSS includes the model and the prefill's activations.")
    return "\n".join(lines)


def write_readme(blocks: dict) -> None:
    sys.path.insert(0, str(HERE))
    from run_all import write_readme as write

    write(blocks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=("accuracy", "memory", "readme"))
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--recent", type=int, default=64)
    ap.add_argument("--lengths", default="8192,16384,32768")
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out-dir", default=str(HERE))
    args = ap.parse_args()
    args.lengths = [int(x) for x in args.lengths.split(",")]
    out = Path(args.out_dir)
    torch.set_num_threads(args.threads)
    if args.part == "accuracy":
        (out / "kv_accuracy.json").write_text(json.dumps(accuracy(args), indent=1) + "\n")
    elif args.part == "memory":
        (out / "kv_memory.json").write_text(json.dumps(memory(args), indent=1) + "\n")
    blocks = {}
    if (out / "kv_accuracy.json").exists():
        report = resummarise(json.loads((out / "kv_accuracy.json").read_text()))
        (out / "kv_accuracy.json").write_text(json.dumps(report, indent=1) + "\n")
        blocks["kv-accuracy"] = accuracy_rows(report)
    if (out / "kv_memory.json").exists():
        blocks["kv-memory"] = memory_rows(json.loads((out / "kv_memory.json").read_text()))
    for name, body in blocks.items():
        print(f"\n<!-- bench:{name} -->\n{body}\n<!-- bench:{name}:end -->")
    if args.part == "readme":
        write_readme(blocks)


if __name__ == "__main__":
    main()
