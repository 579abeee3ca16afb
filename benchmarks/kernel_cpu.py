"""CPU speed of headscope_kernels' torch path against torch's fused SDPA.

Causal, Llama-like GQA shape scaled to fit a small box (default H=8, Hkv=2, d=64,
fp32). SDPA gets K/V already repeated to H heads (built outside the timing); ours
uses GQA by index. Methods alternate, --repeats (>= 3) runs each; best and median per
method and the machine's 1-minute load average before and after (benchmarks/timing.py).
Prints one line per size and writes the figures to benchmarks/kernel_cpu.json.

    python benchmarks/kernel_cpu.py [--sizes 8192 16384] [--repeats 3] [--stats]
"""

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from headscope_kernels import attention_with_stats
from timing import alternate, ratio


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
        with torch.inference_mode():
            timed = alternate(fns, args.repeats)
        row = dict(N=N, H=H, Hkv=Hkv, d=d, dtype="float32", threads=torch.get_num_threads(), **timed,
                   ratios={name: ratio(timed, name, "sdpa") for name in fns if name != "sdpa"})
        print(json.dumps(row), flush=True)
        rows.append(row)
    Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
