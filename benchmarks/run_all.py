"""Regenerate every CPU figure of the README's benchmark section, the new way (methods alternated,
>= 3 runs each, best and median, 1-minute load average before and after each group of runs).

    python benchmarks/run_all.py                # ~19 min on the project's idle 2-core machine
    python benchmarks/run_all.py --readme       # also rewrites the README tables from the results

Runs, one after another (run it on a quiet machine: nothing else running):
  kernel_cpu.py    --sizes 8192 16384 32768 --stats        -> benchmarks/kernel_cpu.json
  kernel_cpu.py    --sizes 8192 16384 --stats --tiles cpp compile --threads 1
                                                           -> benchmarks/kernel_cpu_tile.json
  long_context.py  --lengths 1024,4096,8192,16384,32768    -> benchmarks/long_context.json
                   (+ the needle comparison at 8192 tokens)
  var_generate.py  --new 16 --threads 1 --organism vision --repeats 10  -> benchmarks/var_generate.json
  soft_injection.py --repeats 3 --draws 20                  -> benchmarks/soft_injection.json
                   (accuracy against its controls; it prints and writes its own table)
then prints the markdown rows (and with --readme writes them between the README's
``<!-- bench:NAME -->`` / ``<!-- bench:NAME:end -->`` markers). The GPU table needs a GPU
(benchmarks/kernel_gpu.py) and is not rerun here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kernel_cpu import tile_line  # the tile benchmark's own README sentence (benchmarks/ is the script's folder)

HERE = Path(__file__).resolve().parent
README = HERE.parent / "README.md"
K = {1024: "1K", 2048: "2K", 4096: "4K", 8192: "8K", 16384: "16K", 32768: "32K", 65536: "64K"}


def run(script: str, *args: str) -> None:
    print(f"$ python benchmarks/{script} {' '.join(args)}", flush=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, str(HERE / script), *args], check=True, cwd=HERE.parent,
                   env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)


def seconds(m: dict) -> str:
    return f"{m['best_s']:.2f} s ({m['median_s']:.2f} s)"


def x(r: dict) -> str:
    return f"{r['best']:.2f}x ({r['median']:.2f}x)"


def loads(rows) -> str:
    values = [v for r in rows for v in r["load_1m"]]
    return f"{min(values):.2f}-{max(values):.2f}"


def kernel_rows(path: Path) -> str:
    rows = json.loads(path.read_text())
    lines = ["| tokens | SDPA, best (median) | headscope, output only | headscope, output + lse + top-1 + entropy |",
             "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {K.get(r['N'], r['N'])} | {seconds(r['methods']['sdpa'])} | {x(r['ratios']['ours_out'])} | "
                     f"{x(r['ratios']['ours_stats'])} |")
    lines.append("")
    lines.append(f"Ratios to SDPA, best (median) of {rows[0]['repeats']} alternated runs, {rows[0]['threads']} threads; "
                 f"1-minute load average {loads(rows)}.")
    return "\n".join(lines)


def tile_rows(path: Path) -> str:
    """The CPU tile step: torch.compile of the eager step against the hand-written C++ tile."""
    return tile_line(json.loads(path.read_text()))


def long_context_rows(path: Path) -> str:
    report = json.loads(path.read_text())
    lines = ["| tokens | eager + output_attentions | TransformerLens bridge, hook_pattern | headscope statistics | "
             "plain SDPA (floor) | headscope / SDPA |", "|---|---|---|---|---|---|"]
    for r in report["results"]:
        cells = []
        for method in ("eager", "tl", "headscope", "sdpa"):
            if method in r["methods"]:
                cells.append(f"{seconds(r['methods'][method])}, {r['peak_mb'][method] / 1024:.2f} GB")
            else:
                need = r["skipped"].get(method, "").replace("exceeds memory (", "").rstrip(")")
                cells.append(f"needs {need}: not run" if need else "not run")
        ratio = x(r["headscope_over_sdpa"]) if "headscope_over_sdpa" in r else "-"
        lines.append(f"| {K.get(r['length'], r['length'])} | {' | '.join(cells)} | {ratio} |")
    lines.append("")
    lines.append(f"Best (median) of {report['results'][0]['repeats']} alternated runs, each in its own process "
                 f"(peak RSS); 1-minute load average {loads(report['results'])}.")
    needle = report.get("needle")
    if needle:
        m = needle["methods"]
        text = (f"Needle scoring of one {K.get(needle['length'], needle['length'])}-token trial: headscope's "
                f"teacher-forced pass {seconds(m['headscope_teacher_forced'])}, its decode variant "
                f"{seconds(m['headscope_decode'])}")
        if "transformers_decode_output_attentions" in m:
            text += (f", the decode approach as done with transformers (generate with eager attention and "
                     f"output_attentions) {seconds(m['transformers_decode_output_attentions'])}: "
                     f"{x(needle['transformers_over_teacher_forced'])} slower than the teacher-forced pass")
        lines.append("")
        lines.append(text + f" (load {needle['load_1m'][0]:.2f}-{needle['load_1m'][1]:.2f}).")
    return "\n".join(lines)


def var_rows(path: Path) -> str:
    report = json.loads(path.read_text())
    lines = []
    for key, label in (("random_llava_2k", "random-init LLaVA-shaped model, 2048 tokens (576 image tokens)"),
                       ("vision", "vision organism")):
        if key not in report:
            continue
        r = report[key]
        ms = lambda name: f"{r[name] * 1000:.0f} ms"  # noqa: E731
        lines.append(f"- {label}: plain SDPA generate best {ms('sdpa_best_s')} (median {ms('sdpa_median_s')}), "
                     f"with VAR best {ms('var_best_s')} (median {ms('var_median_s')}): {r['ratio_best']:.2f}x "
                     f"on the best times, {r['ratio_median']:.2f}x on the medians ({r['repeats']} alternated runs each)")
    lines.append(f"- load average {report['loadavg_1min_before']:.2f} before, {report['loadavg_1min_after']:.2f} after")
    return "\n".join(lines)


def write_readme(blocks: dict[str, str]) -> None:
    text = README.read_text()
    for name, body in blocks.items():
        start, end = f"<!-- bench:{name} -->", f"<!-- bench:{name}:end -->"
        if start not in text or end not in text:
            print(f"README has no {start} ... {end} markers: {name} not written", file=sys.stderr)
            continue
        head, rest = text.split(start, 1)
        text = head + start + "\n" + body + "\n" + end + rest.split(end, 1)[1]
    fd, tmp = tempfile.mkstemp(dir=README.parent, prefix=".README.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, README)
    print(f"wrote {README}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--readme", action="store_true", help="write the tables into README.md")
    ap.add_argument("--only-print", action="store_true", help="print the rows from the existing JSON files")
    ap.add_argument("--out-dir", default=str(HERE), help="where the JSON files go [benchmarks/]")
    args = ap.parse_args()
    reps, out = str(args.repeats), Path(args.out_dir)
    start = time.perf_counter()
    if not args.only_print:
        print(f"load average at start: {os.getloadavg()[0]:.2f} (run this on a quiet machine)", flush=True)
        run("kernel_cpu.py", "--sizes", "8192", "16384", "32768", "--stats", "--repeats", reps,
            "--json", str(out / "kernel_cpu.json"))
        run("kernel_cpu.py", "--sizes", "8192", "16384", "--stats", "--tiles", "cpp", "compile", "--threads", "1",
            "--repeats", str(max(args.repeats, 5)), "--json", str(out / "kernel_cpu_tile.json"))
        run("long_context.py", "--lengths", "1024,4096,8192,16384,32768", "--needle-length", "8192",
            "--repeats", reps, "--json", str(out / "long_context.json"))
        # a generate call takes 0.05-0.5 s here, so more runs cost little and steady the figure
        run("var_generate.py", "--new", "16", "--repeats", str(max(args.repeats, 10)), "--threads", "1",
            "--organism", "vision",
            "--json", str(out / "var_generate.json"))
        run("soft_injection.py", "--repeats", reps, "--draws", "20", "--json", str(out / "soft_injection.json"))
        print(f"all benchmarks: {time.perf_counter() - start:.0f} s", flush=True)
    blocks = {"kernel-cpu": kernel_rows(out / "kernel_cpu.json"),
              "cpu-tile": tile_rows(out / "kernel_cpu_tile.json"),
              "long-context": long_context_rows(out / "long_context.json"),
              "var": var_rows(out / "var_generate.json")}
    for name, body in blocks.items():
        print(f"\n<!-- bench:{name} -->\n{body}\n<!-- bench:{name}:end -->")
    if args.readme:
        write_readme(blocks)
    run("soft_injection.py", "--only-print", "--json", str(out / "soft_injection.json"),
        *(["--readme"] if args.readme else []))


if __name__ == "__main__":
    main()
