"""GPU: the Triton statistics kernel against PyTorch SDPA (flash), and a 128K statistics pass
through a random-init Llama-3-8B-shaped model.

    python benchmarks/kernel_gpu.py [--sizes 8192 ... 131072] [--model-length 131072] [--tune]

Kernel: Llama-3-8B attention shape (32 heads, 8 kv heads, d 128), bf16, causal, batch 1.
  sdpa_flash   F.scaled_dot_product_attention restricted to the flash backend, K/V repeated to
               32 heads outside the timing (the floor the target refers to);
  sdpa_cudnn   the same restricted to cuDNN's attention (what torch's default picks on Hopper);
  ours_out     headscope_kernels.attention_with_stats, output only (Triton);
  ours_stats   output + lse + top-1 + entropy + group mass (one 16-token key group);
  received     the second pass: attention received per key over all query rows.
Each figure is the median of --repeats CUDA-event timings after a warm-up. Throughput counts the
causal FLOPs of QK^T and PV (2 * 2 * H * N^2 * d / 2). ``--tune`` also times launch configurations
of the stats kernel and the cost of each statistic alone at 32K (what the kernel's defaults come from).

Model: LlamaForCausalLM with Llama-3-8B's config (random weights, bf16), one 128K-token forward of
the decoder (no logits: 128K x 128K-vocab logits alone would take 32 GB) with headscope's statistics
on every head of every layer, against the same forward with stock SDPA. Peak memory is
torch.cuda.max_memory_allocated. Results go to --json (default benchmarks/kernel_gpu.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from headscope_kernels import attention_received, attention_with_stats
from headscope_kernels import triton_attention as tri

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072,
                 rms_norm_eps=1e-5)


def cuda_time(fn, repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` CUDA-event timings, after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def inputs(n: int, heads=32, kv_heads=8, d=128, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, heads, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, kv_heads, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, kv_heads, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
    groups = torch.full((1, n), -1, dtype=torch.long, device="cuda")
    groups[0, n // 2 : n // 2 + 16] = 0  # a needle-sized key group
    return q, k, v, groups


STATS = ("out", "lse", "top1", "entropy", "group_mass")


CONFIGS = [(64, 64, 4, None), (64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, None), (128, 64, 8, 2),
           (128, 32, 4, None), (64, 32, 4, 2), (64, 128, 4, 2)]
VARIANTS = {"out": ("out",), "out+lse": ("out", "lse"), "out+top1": ("out", "top1"),
            "out+entropy": ("out", "entropy"), "out+group_mass": ("out", "group_mass"), "all": STATS}


def _stats_call(q, k, v, groups, outputs, bm, bn, warps, stages):
    """The Triton forward called directly, so that the launch knobs can be set."""
    scale = torch.full((q.shape[1],), q.shape[-1] ** -0.5, device="cuda")
    want = dict(want_lse="lse" in outputs, want_groups="group_mass" in outputs, want_top1="top1" in outputs,
                want_entropy="entropy" in outputs)
    return lambda: tri.forward(q, k, v, qscale=scale, causal=True, q_offset=0, key_padding_mask=None,
                               attn_mask=None, sliding_window=None, group_ids=groups, num_groups=1,
                               want_out="out" in outputs, block_q=bm, block_k=bn, num_warps=warps,
                               num_stages=stages, **want)


def tune(n: int, repeats: int) -> dict:
    """Time tile / warp / stage configurations of the stats kernel (all statistics); the fastest wins."""
    q, k, v, groups = inputs(n)
    rows = []
    for bm, bn, warps, stages in CONFIGS:
        row = dict(block_q=bm, block_k=bn, num_warps=warps, num_stages=stages)
        try:
            row["time_s"] = round(cuda_time(_stats_call(q, k, v, groups, STATS, bm, bn, warps, stages), repeats), 5)
        except Exception as exc:  # e.g. out of shared memory for a large tile
            row["error"] = str(exc)[:160]
        rows.append(row)
        print(json.dumps(row), flush=True)
    best = min((r for r in rows if "time_s" in r), key=lambda r: r["time_s"])
    return {"length": n, "configs": rows, "best": best}


def breakdown(n: int, repeats: int, config) -> dict:
    """What each statistic costs: the kernel with one statistic at a time, against output only."""
    q, k, v, groups = inputs(n)
    times = {name: round(cuda_time(_stats_call(q, k, v, groups, outs, *config), repeats), 5)
             for name, outs in VARIANTS.items()}
    row = {"length": n, "config": list(config), "time_s": times}
    print(json.dumps(row), flush=True)
    return row


def kernel_row(n: int, repeats: int, blocks) -> dict:
    q, k, v, groups = inputs(n)
    H, d = q.shape[1], q.shape[-1]
    scale = d ** -0.5
    k_rep, v_rep = k.repeat_interleave(H // k.shape[1], 1), v.repeat_interleave(H // k.shape[1], 1)
    flops = 2 * 2 * H * n * n * d / 2
    sdpa = lambda: F.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=True, scale=scale)  # noqa: E731
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.FLASH_ATTENTION]):
        t_sdpa = cuda_time(sdpa, repeats)
    try:  # cuDNN's attention, which torch picks by default on Hopper when it can
        with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.CUDNN_ATTENTION]):
            t_cudnn = round(cuda_time(sdpa, repeats), 5)
    except RuntimeError as exc:
        t_cudnn = f"unavailable: {str(exc)[:80]}"
    kw = dict(causal=True, backend="triton", block_q=blocks[0], block_k=blocks[1])
    t_out = cuda_time(lambda: attention_with_stats(q, k, v, scale, outputs=("out",), **kw), repeats)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t_stats = cuda_time(lambda: attention_with_stats(q, k, v, scale, outputs=STATS, key_groups=groups,
                                                     num_groups=1, **kw), repeats)
    stats_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    lse = attention_with_stats(q, k, v, scale, outputs=("lse",), **kw).lse
    t_rec = cuda_time(lambda: attention_received(q, k, scale, lse, causal=True, backend="triton"), repeats)
    return dict(N=n, H=H, Hkv=k.shape[1], d=d, dtype="bfloat16",
                sdpa_flash_s=round(t_sdpa, 5), sdpa_cudnn_s=t_cudnn, ours_out_s=round(t_out, 5), ours_stats_s=round(t_stats, 5),
                received_s=round(t_rec, 5),
                sdpa_flash_tflops=round(flops / t_sdpa / 1e12, 1), ours_stats_tflops=round(flops / t_stats / 1e12, 1),
                stats_throughput_vs_flash=round(t_sdpa / t_stats, 3), out_throughput_vs_flash=round(t_sdpa / t_out, 3),
                stats_extra_memory_mb=round(stats_mb, 1))


def kernel_sweep(sizes, repeats, blocks) -> list[dict]:
    rows = []
    for n in sizes:
        rows.append(kernel_row(n, repeats, blocks))
        print(json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()
    return rows


def model_pass(n: int) -> dict:
    """One n-token decoder forward of a random-init Llama-3-8B-shaped model: stats vs stock SDPA."""
    import transformers as tf

    from headscope.model import HeadModel

    start = time.perf_counter()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = tf.LlamaForCausalLM._from_config(tf.LlamaConfig(**LLAMA3_8B), dtype=torch.bfloat16,
                                                 attn_implementation="sdpa")
    model.eval()
    build_s = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    hm = HeadModel(model)
    ids = torch.randint(0, LLAMA3_8B["vocab_size"], (1, n), device="cuda")
    groups = torch.full((1, n), -1, dtype=torch.long)
    groups[0, n // 2 : n // 2 + 16] = 0
    out = dict(length=n, parameters=params, build_s=round(build_s, 1),
               weights_gb=round(torch.cuda.memory_allocated() / 2**30, 2))

    def timed(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        result = fn()
        torch.cuda.synchronize()
        return result, time.perf_counter() - t0, torch.cuda.max_memory_allocated() / 2**30

    with torch.inference_mode():
        model.model(ids[:, :1024])  # warm-up: kernels compiled, cuBLAS handles made
        with hm.attention_stats(["top1", "group_mass", "entropy"], key_groups=groups, num_groups=1):
            model.model(ids[:, :1024])
        _, t_sdpa, peak_sdpa = timed(lambda: model.model(ids))

        def with_stats():
            with hm.attention_stats(["top1", "group_mass", "entropy"], key_groups=groups, num_groups=1) as rec:
                model.model(ids)
            return rec

        rec, t_stats, peak_stats = timed(with_stats)
    top1 = rec.top1_index()  # [layers, B, H, N]
    mass = rec.group_mass()
    out.update(sdpa_s=round(t_sdpa, 2), sdpa_peak_gb=round(peak_sdpa, 2), headscope_stats_s=round(t_stats, 2),
               headscope_peak_gb=round(peak_stats, 2), stats_vs_sdpa_time=round(t_stats / t_sdpa, 3),
               recorded=dict(top1_index=list(top1.shape), group_mass=list(mass.shape)),
               top1_in_causal_range=bool(((top1 >= 0) & (top1 <= torch.arange(n, device=top1.device))).all()),
               eager_pattern_one_layer_gb=round(LLAMA3_8B["num_attention_heads"] * n * n * 2 / 2**30, 1))
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[8192, 16384, 32768, 65536, 131072])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tune", action="store_true",
                    help="time launch configurations and each statistic's cost at 32K (informs the kernel's defaults)")
    ap.add_argument("--block-q", type=int, default=None)
    ap.add_argument("--block-k", type=int, default=None)
    ap.add_argument("--model-length", type=int, default=131072, help="0 skips the model pass")
    ap.add_argument("--json", default=str(Path(__file__).with_name("kernel_gpu.json")))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("kernel_gpu.py needs a CUDA GPU (for the CPU figures: benchmarks/kernel_cpu.py)")
    import triton

    report = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  host=platform.node())
    blocks = (args.block_q, args.block_k)
    if args.tune:
        report["tuning"] = tune(32768, args.repeats)
        best = report["tuning"]["best"]
        report["breakdown"] = [breakdown(32768, args.repeats, (64, 64, 4, None)),
                               breakdown(32768, args.repeats, (best["block_q"], best["block_k"],
                                                                best["num_warps"], best["num_stages"]))]
    report["blocks"] = dict(block_q=blocks[0], block_k=blocks[1], note="None = the kernel's default")
    if args.sizes:
        report["kernel"] = kernel_sweep(args.sizes, args.repeats, blocks)
    if args.model_length:
        report["model"] = model_pass(args.model_length)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
