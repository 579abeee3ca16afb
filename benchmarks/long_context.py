"""Long-context head statistics: time and peak memory per method and context length.

    python benchmarks/long_context.py --lengths 1024,4096,8192,16384,32768 --json benchmarks/long_context.json

Methods, on one random-init Llama-shaped model (GQA):
  eager      transformers eager attention + output_attentions (the full pattern of every layer)
  tl         TransformerLens 4 TransformerBridge.run_with_cache for blocks.*.attn.hook_pattern
  headscope  headscope statistics pass (top-1 key, group mass, entropy for every head and row)
  sdpa       plain SDPA forward: the floor
Each run of a (method, length) is its own subprocess, so its peak RSS is its own; the methods
alternate (headscope and sdpa as one group, then eager and tl as another: see main), --repeats
(>= 3) runs each, and every figure is reported as best and median with the 1-minute load average
before and after (benchmarks/timing.py). A method whose estimated memory exceeds what the machine
has free is recorded as such, not run.

Also (--needle-length, default 8192): needle scoring of one trial, headscope teacher-forced (one
pass) vs the decode approach as done with transformers (generate with eager attention and
output_attentions, hits read from the returned patterns), and headscope's own decode variant,
alternated the same way within one process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from timing import alternate, ratio

MODEL = dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
             intermediate_size=1024, vocab_size=2000, max_position_embeddings=65536)
METHODS = ("eager", "tl", "headscope", "sdpa")


def _available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 16 << 30


def estimated_bytes(method: str, n: int) -> int:
    """Attention-pattern memory the method must hold (fp32), beyond the model itself."""
    layers, heads = MODEL["num_hidden_layers"], MODEL["num_attention_heads"]
    pattern = heads * n * n * 4
    if method == "eager":  # all layers' patterns are returned, plus scores/softmax temporaries
        return (layers + 2) * pattern
    if method == "tl":  # cached patterns of every layer, plus scores and the pattern being built
        return (layers + 3) * pattern
    return 0


def build_model(folder: Path) -> None:
    import torch
    import transformers as tf

    from headscope.tasks.needle import DEFAULT_TEMPLATE, load_haystack, load_needles
    from headscope.zoo.training import build_word_tokenizer

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**MODEL))
    model.save_pretrained(folder)
    needles = load_needles()
    texts = load_haystack() + [n.needle for n in needles] + [n.question for n in needles] + [DEFAULT_TEMPLATE]
    build_word_tokenizer(texts).save_pretrained(folder)


def _child(method: str, n: int, folder: str) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    ids = torch.randint(10, MODEL["vocab_size"], (1, n))
    if method == "tl":
        from transformer_lens.model_bridge import TransformerBridge

        bridge = TransformerBridge.boot_transformers(folder, device="cpu")
        run = lambda: bridge.run_with_cache(ids, names_filter=lambda name: name.endswith("hook_pattern"))  # noqa: E731
    else:
        from headscope.model import HeadModel

        hm = HeadModel.load(folder)
        if method == "eager":
            hm.model.set_attn_implementation("eager")
            run = lambda: hm.model(ids, output_attentions=True)  # noqa: E731
        elif method == "sdpa":
            run = lambda: hm.model(ids)  # noqa: E731
        else:
            groups = torch.full((1, n), -1)
            groups[0, n // 2 : n // 2 + 16] = 0  # a needle-sized key group

            def run():
                with hm.attention_stats(["top1", "group_mass", "entropy"], key_groups=groups, num_groups=1):
                    return hm.model(ids)

    with torch.no_grad():  # warm-up on a short input (first-call overheads), then the timed run
        full, ids = ids, ids[:, :128]
        run()
        ids = full
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with torch.no_grad():
        start = time.perf_counter()
        run()
        elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"time_s": round(elapsed, 3), "peak_mb": round(peak, 1), "setup_mb": round(before, 1)}


def _needle_child(n: int, folder: str, repeats: int) -> dict:
    import torch

    from headscope.analyzers.retrieval import _hits, _score_decode, _score_teacher_forced
    from headscope.model import HeadModel
    from headscope.tasks.needle import NeedleTask

    torch.set_num_threads(os.cpu_count() or 1)
    hm = HeadModel.load(folder)
    task = NeedleTask(hm.tokenizer, lengths=[256, n], depths=[50], use_chat_template=False)
    warm, trial = task.trials()[0], task.trials()[-1]
    out = {"length": n, "answer_tokens": len(trial.answer_ids)}
    ids = torch.tensor([trial.prompt_ids])

    def transformers_decode():  # the decode approach as done with transformers: eager attention, output_attentions
        hm.model.set_attn_implementation("eager")
        try:
            gen = hm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(trial.answer_ids),
                                    do_sample=False, output_attentions=True, return_dict_in_generate=True,
                                    pad_token_id=0)
        finally:
            hm.model.set_attn_implementation("sdpa")
        seq = gen.sequences
        for step, attentions in enumerate(gen.attentions):  # per step: per layer [1, H, q, k]
            top1 = torch.stack([a[:, :, -1:] for a in attentions]).argmax(-1)
            target = seq[:, ids.shape[1] + step : ids.shape[1] + step + 1]
            _hits(top1, seq, [trial.needle_span], target)

    fns = {"headscope_teacher_forced": lambda: _score_teacher_forced(hm, [trial], [0], 0, "needle"),
           "headscope_decode": lambda: _score_decode(hm, [trial], [0], 0, "needle")}
    need = estimated_bytes("eager", n)
    if need > 0.8 * _available_bytes():
        out["transformers_decode_output_attentions"] = f"exceeds memory (~{need / 2**30:.0f} GB)"
    else:
        fns["transformers_decode_output_attentions"] = transformers_decode
    with torch.no_grad():
        _score_teacher_forced(hm, [warm], [0], 0, "needle")  # warm-up on a short trial: first-call overheads
        _score_decode(hm, [warm], [0], 0, "needle")
        out.update(alternate(fns, repeats, warmup=False))
    if "transformers_decode_output_attentions" in fns:
        out["transformers_over_teacher_forced"] = ratio(out, "transformers_decode_output_attentions",
                                                        "headscope_teacher_forced")
    out["peak_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--needle-length", type=int, default=8192, help="0 skips the needle comparison")
    parser.add_argument("--repeats", type=int, default=3, help="runs per method (>= 3), alternated")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "N", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, n, folder = args.child
        result = _needle_child(int(n), folder, args.repeats) if method == "needle" else _child(method, int(n), folder)
        print(json.dumps(result))
        return

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "llama"
        build_model(folder)

        def child(method: str, n: int) -> dict:
            run = subprocess.run([sys.executable, __file__, "--child", method, str(n), str(folder),
                                  "--repeats", str(args.repeats)], capture_output=True, text=True,
                                 env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
            if run.returncode != 0:
                raise RuntimeError(f"{method} at {n} tokens failed: {run.stderr.strip().splitlines()[-1:]}")
            return json.loads(run.stdout.strip().splitlines()[-1])

        for n in [int(x) for x in args.lengths.split(",") if x.strip()]:
            row = {"length": n, "skipped": {}}
            peaks: dict[str, list[float]] = {}

            def runner(method: str):
                def run() -> float:
                    out = child(method, n)
                    peaks.setdefault(method, []).append(out["peak_mb"])
                    return out["time_s"]
                return run

            fns = {}
            for method in args.methods.split(","):
                need = estimated_bytes(method, n)
                if need > 0.8 * _available_bytes():
                    row["skipped"][method] = f"exceeds memory (~{need / 2**30:.1f} GB)"
                else:
                    fns[method] = runner(method)
            # eager and tl hold GBs; a process started right after one of them pays the system's
            # reclaim of that memory (measured: ~1.2 s more for the next 8K run), so headscope and SDPA,
            # the pair the speed target compares, alternate as their own group, before the pattern
            # builders alternate as theirs. Each child warms up itself.
            light = {m: fn for m, fn in fns.items() if m in ("headscope", "sdpa")}
            heavy = {m: fn for m, fn in fns.items() if m not in light}
            timed = [alternate(group, args.repeats, warmup=False) for group in (light, heavy) if group]
            row["methods"] = {m: s for t in timed for m, s in t["methods"].items()}
            row["load_1m"] = [timed[0]["load_1m"][0], timed[-1]["load_1m"][1]]
            row["repeats"] = args.repeats
            row["peak_mb"] = {m: max(p) for m, p in peaks.items()}
            if "headscope" in fns and "sdpa" in fns:
                row["headscope_over_sdpa"] = ratio(row, "headscope", "sdpa")
            results.append(row)
            print(json.dumps(row), flush=True)
        needle = child("needle", args.needle_length) if args.needle_length else None
        if needle:
            print(json.dumps(needle), flush=True)

    report = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB",
        "model": MODEL,
        "results": results,
        "needle": needle,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
