"""CPU speed of headscope_kernels' torch path against torch's fused SDPA.

Causal, Llama-like GQA shape scaled to fit a small box (default H=8, Hkv=2, d=64,
fp32). SDPA gets K/V already repeated to H heads (built outside the timing); ours
uses GQA by index. Methods alternate, --repeats (>= 3) runs each; best and median per
method and the machine's 1-minute load average before and after (benchmarks/timing.py).
Prints one line per size and writes the figures to benchmarks/kernel_cpu.json.

    python benchmarks/kernel_cpu.py [--sizes 8192 16384] [--repeats 3] [--stats]

``--tiles cpp compile`` times headscope once per CPU tile step instead (the hand-written C++ tile
against torch.compile of the eager step, ``reference.CPU_STEP``), alternated with SDPA, and
prints the README line comparing them:

    python benchmarks/kernel_cpu.py --sizes 8192 16384 --stats --tiles cpp compile \
        --json benchmarks/kernel_cpu_tile.json
"""

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from headscope_kernels import attention_with_stats, reference
from timing import alternate, ratio

K = {8192: "8K", 16384: "16K", 32768: "32K"}


def tile_line(rows: list[dict]) -> str:
    """One README line: the compiled eager step against the C++ tile, per size (best and median)."""
    parts, loads = [], [v for r in rows for v in r["load_1m"]]
    for r in rows:
        for what in ("out", "stats"):
            a, b = f"ours_{what}_compile", f"ours_{what}_cpp"
            if a in r["methods"] and b in r["methods"]:
                x = ratio(r, a, b)
                parts.append(f"{K.get(r['N'], r['N'])} {'output' if what == 'out' else 'output + statistics'} "
                             f"{x['best']:.2f}x ({x['median']:.2f}x)")
    return (f"torch.compile of the eager tile step / the C++ tile, best (median) of {rows[0]['repeats']} "
            f"alternated runs, {rows[0]['threads']} threads, 1-minute load {min(loads):.2f}-{max(loads):.2f}: "
            + "; ".join(parts) + ".")


def with_step(step, fn):
    def run():
        reference.CPU_STEP = step
        try:
            return fn()
        finally:
            reference.CPU_STEP = "cpp"
    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[8192, 16384])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--block-q", type=int, default=None)
    ap.add_argument("--block-k", type=int, default=None)
    ap.add_argument("--stats", action="store_true", help="also time all statistics")
    ap.add_argument("--tiles", nargs="+", choices=reference.CPU_STEPS, default=None,
                    help="time headscope once per CPU tile step (e.g. cpp compile)")
    ap.add_argument("--json", default=str(Path(__file__).with_name("kernel_cpu.json")))
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    H, Hkv, d = args.heads, args.kv_heads, args.head_dim
    rows = []
    for N in args.sizes:
        g = torch.Generator().manual_seed(0)
        q = torch.randn(1, H, N, d, generator=g)
        k = torch.randn(1, Hkv, N, d, generator=g)
        v = torch.randn(1, Hkv, N, d, generator=g)
        k_rep, v_rep = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
        scale = d ** -0.5
        fns = {
            "sdpa": lambda: F.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=True, scale=scale),
            "ours_out": lambda: attention_with_stats(q, k, v, scale, causal=True, backend="torch",
                                                     block_q=args.block_q, block_k=args.block_k),
        }
        if args.stats:
            fns["ours_stats"] = lambda: attention_with_stats(
                q, k, v, scale, causal=True, backend="torch", outputs=("out", "lse", "top1", "entropy"),
                block_q=args.block_q, block_k=args.block_k)
        if args.tiles:
            fns = {"sdpa": fns["sdpa"], **{f"{name}_{step}": with_step(step, fn) for step in args.tiles
                                          for name, fn in fns.items() if name != "sdpa"}}
        with torch.inference_mode():
            timed = alternate(fns, args.repeats)
        row = dict(N=N, H=H, Hkv=Hkv, d=d, dtype="float32", threads=torch.get_num_threads(), **timed,
                   ratios={name: ratio(timed, name, "sdpa") for name in fns if name != "sdpa"})
        print(json.dumps(row), flush=True)
        rows.append(row)
    Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    if args.tiles and {"cpp", "compile"} <= set(args.tiles):
        print(tile_line(rows))


if __name__ == "__main__":
    main()
