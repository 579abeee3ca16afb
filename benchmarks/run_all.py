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
and the vision organism's tables (``--only vision``: just these, ~10 min on one thread):
  python -m headscope.zoo.train_vision --out headscope/zoo/vision --remeasure  -> its organism.json
  vision_tables.py                                         -> benchmarks/vision_tables.json
  vision_pursuit.py                                        -> benchmarks/vision_pursuit.json
and the needle ablation against 20 random draws (``--only needle``):
  needle_control.py                                        -> benchmarks/needle_control.json
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
    """``python benchmarks/SCRIPT ARGS``, or ``python -m MODULE ARGS`` for a dotted module name."""
    command = ["-m", script] if script.startswith("headscope.") else [str(HERE / script)]
    print(f"$ python {'-m ' + script if command[0] == '-m' else 'benchmarks/' + script} {' '.join(args)}", flush=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, *command, *args], check=True, cwd=HERE.parent,
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


VISION_COLUMNS = (("chair_i", "CHAIR_i"), ("chair_s", "CHAIR_s"), ("caption_recall", "caption recall"),
                  ("pope_acc", "POPE acc"), ("pope_f1", "POPE F1"), ("pope_adversarial_f1", "POPE adversarial F1"))
VISION_ROWS = (("greedy", "greedy"),
               ("vhr_per_input", "VHR per input (the paper's rule: each input's own VHD heads, x2)"),
               ("vhr_per_input_no_filter", "VHR per input, no outlier filter"),
               ("vhr_fixed", "VHR, heads fixed from the 16 probe scenes (variant: {heads})"),
               ("vhr_fixed_no_filter", "VHR, fixed heads, no outlier filter (variant: {heads})"),
               ("var_paper", "VAR, the paper's rule (p 0.6, rho 0.5)"),
               ("var_first_token", "VAR, former first-token rule (not the paper's)"))


def vision_rows(path: Path) -> str:
    """The vision organism's CHAIR / POPE table with the random-head control's intervals."""
    report = json.loads(path.read_text())
    rows, control = report["rows"], report["rows"]["random"]
    lines = ["| decoding | " + " | ".join(label for _, label in VISION_COLUMNS) + " |",
             "|---|" + "---|" * len(VISION_COLUMNS)]
    for key, label in VISION_ROWS:
        r = rows[key]
        cells = []
        for metric, _ in VISION_COLUMNS:
            value = f"{r['metrics'][metric]:.3f}"
            verdict = rows["verdicts"].get(key, {}).get(metric, "") if key.startswith("vhr") else ""  # head edits only
            cells.append(f"**{value}**" if verdict in ("beats random", "worse than random") else value)
        lines.append(f"| {label.format(heads=r.get('heads', ''))} | " + " | ".join(cells) + " |")
    cells = [f"{control['mean'][m]:.3f} [{control['interval'][m][0]:.3f}, {control['interval'][m][1]:.3f}]"
             for m, _ in VISION_COLUMNS]
    lines.append(f"| random heads, {report['per_layer']} per layer in layers "
                 f"{', '.join(map(str, report['layers']))}, x2 ({control['draws']} draws, mean [95% bootstrap "
                 f"interval]) | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"{report['scenes']} held-out partner-absent scenes (seed {report['scene_seed']}); bold: a VHR figure "
                 f"outside the random heads' interval (the 95% bootstrap interval of their mean). Against random heads:")
    names = dict(VISION_ROWS)
    for key in ("vhr_per_input", "vhr_fixed"):
        v = rows["verdicts"][key]
        lines.append(f"- {names[key].split(' (')[0]}: " + "; ".join(f"{label} {v[m]}" for m, label in VISION_COLUMNS))
    effect = rows["filter_effect_per_input"]
    fixed, nofilter = rows["vhr_fixed"]["heads"], rows["vhr_fixed_no_filter"]["heads"]
    swapped_out = sorted(set(nofilter.split(", ")) - set(fixed.split(", ")))
    swapped_in = sorted(set(fixed.split(", ")) - set(nofilter.split(", ")))
    top = lambda d: ", ".join(f"{h} {c}" for h, c in list(d.items())[:4]) or "none"  # noqa: E731
    lines.append(f"- outlier filter: on the probe set it swaps {', '.join(swapped_out) or 'nothing'} for "
                 f"{', '.join(swapped_in) or 'nothing'}; per input it changes the selection of {effect['changed']} of "
                 f"{effect['inputs']} prompts (heads zeroed, times: {top(effect['dropped'])}; chosen instead: "
                 f"{top(effect['added'])})")
    var = rows["var_paper"]
    lines.append(f"- VAR, the paper's rule: massive dims {var['dims'] or 'none'}, tau {var['tau']:.2f} (scaled to "
                 f"d_model), {var['visual_sink_layers']} (prefill, layer) pairs with a visual sink, "
                 f"{var['rows_edited']} rows edited; the former rule edited {rows['var_first_token']['rows_edited']} "
                 f"of {rows['var_first_token']['rows_seen']} rows")
    lines.append(f"- {report['seconds']:.0f} s on one thread, load {report['load_1m'][0]:.1f}-{report['load_1m'][1]:.1f}")
    return "\n".join(lines)


def vision_pursuit_rows(path: Path) -> str:
    """Head pursuit on the vision organism: suppressing the top heads per concept against random heads."""
    report = json.loads(path.read_text())
    base = report["base"]
    lines = ["| concept | heads suppressed | shape accuracy | colour accuracy | random heads: shape | "
             "random heads: colour |", "|---|---|---|---|---|---|",
             f"| none | | {base['kind']['accuracy']:.3f} | {base['colour']['accuracy']:.3f} | | |"]
    for concept, entry in report["concepts"].items():
        for e in entry["edits"].values():
            r = e["random"]
            cell = lambda a: (f"**{e['edited'][a]['accuracy']:.3f}**" if e["verdict"][a] == "beats random"  # noqa: E731
                              else f"{e['edited'][a]['accuracy']:.3f}")
            ci = lambda a: f"{r['mean'][a]:.3f} [{r['interval'][a][0]:.3f}, {r['interval'][a][1]:.3f}]"  # noqa: E731
            lines.append(f"| {'shapes' if concept == 'kind' else 'colours'} | {', '.join(e['heads'])} | {cell('kind')} | "
                         f"{cell('colour')} | {ci('kind')} | {ci('colour')} |")
    lines.append("")
    lines.append(f"Random heads: the same count per layer, {report['draws']} draws, mean [95% bootstrap interval]; "
                 f"bold: below the interval (beats random). {report['scenes']} test scenes, {report['fit_scenes']} "
                 f"fitting scenes, x{report['alpha']:g}.")
    return "\n".join(lines)


def vision_sinks_rows(path: Path) -> str:
    """Largest phi per layer of each vision model checked (benchmarks/vision_sinks.py)."""
    report = json.loads(path.read_text())
    lines = ["| model | d_model (sqrt d; tau scaled) | training steps | layer | max phi, image tokens | max phi, text "
             "tokens | max abs h | massive dims | attention to the top-phi image token / mean image token |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, m in report["models"].items():
        label = name if name == "vision" else f"wider organism ({Path(name).name})"
        for r in m["layers"]:
            lines.append(f"| {label} | {m['d_model']} ({m['ceiling_sqrt_d']:.1f}; {m['tau_scaled']:.2f}) | "
                         f"{m.get('training_steps', 'shipped')} | {r['layer']} | {r['max_phi_image']:.2f} | "
                         f"{r['max_phi_text']:.2f} | {r['max_abs_h']:.1f} | {m['massive_dims'] or 'none'} | "
                         f"{r['attention_top_phi_image_token']:.3f} / {r['attention_mean_image_token']:.3f} |")
    lines.append("")
    lines.append(f"{report['scenes']} held-out scenes, caption prompt; phi over every hidden dim (VAR itself "
                 "uses only the massive dims).")
    for name, m in report["models"].items():
        if "training_command" in m:
            lines.append(f"The wider organism: `{m['training_command']}` ({m['wall_time_s']:.0f} s wall on one nice'd "
                         f"thread of the shared machine, final loss {m['final_loss']:.3f}).")
    return "\n".join(lines)


def needle_control_rows(path: Path) -> str:
    """The retrieval organism's top-k ablation against random other heads."""
    r = json.loads(path.read_text())
    c = r["random"]
    low, high = c["interval"]["accuracy"]
    values = [d["accuracy"] for d in c["values"]]
    return (f"- ablating the top {len(r['top'].split(', '))} ({r['top']}) leaves {r['ablated']:.3f} of {r['base']:.3f}; "
            f"as many random other heads ({c['draws']} draws, seed {c['seed']}) {c['mean']['accuracy']:.3f}, 95% "
            f"bootstrap interval [{low:.3f}, {high:.3f}], single draws {min(values):.2f}-{max(values):.2f}: the top "
            f"heads' ablation is {r['verdict'].replace('beats random', 'outside the interval (beats random)')} "
            f"(`python benchmarks/needle_control.py`; the control alone: `headscope eval --task needle --random 3 "
            f"--exclude ranking.csv --top 3 --seed 0`);")


def vision_organism_rows() -> str:
    """The vision organism's held-out figures, from its organism.json (re-measured by
    ``python -m headscope.zoo.train_vision --remeasure``)."""
    meta = json.loads((HERE.parent / "headscope" / "zoo" / "vision" / "organism.json").read_text())
    held = meta["heldout"]
    m = held["metrics"]
    pope = "; ".join(f"{s} {m[f'pope_{s}_acc']:.3f} / {m[f'pope_{s}_f1']:.3f} / {m[f'pope_{s}_yes_share']:.3f}"
                     for s in ("random", "popular", "adversarial"))
    return (f"On {held['scenes']} held-out scenes where an anchor is present and its partner absent (seed "
            f"{held['seed']}; `headscope eval --task hallucination --model vision --scenes {held['scenes']}`): CHAIR_i "
            f"{m['chair_i']:.3f}, CHAIR_s {m['chair_s']:.3f} (caption recall of true objects {m['caption_recall']:.3f}); "
            f"POPE accuracy / F1 / yes-share: {pope}.")


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
    ap.add_argument("--only", choices=("speed", "vision", "needle"), default=None,
                    help="one group: the speed benchmarks, the vision organism's tables (~10 min, one thread), or "
                    "the needle ablation against random heads")
    args = ap.parse_args()
    reps, out = str(args.repeats), Path(args.out_dir)
    start = time.perf_counter()
    if not args.only_print and args.only in (None, "vision"):
        run("headscope.zoo.train_vision", "--out", "headscope/zoo/vision", "--remeasure")
        run("vision_tables.py", "--json", str(out / "vision_tables.json"))
        run("vision_pursuit.py", "--out", str(out / "vision_pursuit.json"))
    if not args.only_print and args.only in (None, "needle"):
        run("needle_control.py", "--json", str(out / "needle_control.json"))
    if not args.only_print and args.only in (None, "speed"):
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
    blocks = {}
    if args.only in (None, "speed"):
        blocks.update({"kernel-cpu": kernel_rows(out / "kernel_cpu.json"),
                       "cpu-tile": tile_rows(out / "kernel_cpu_tile.json"),
                       "long-context": long_context_rows(out / "long_context.json"),
                       "var": var_rows(out / "var_generate.json")})
    if args.only in (None, "vision"):
        blocks.update({"vision": vision_rows(out / "vision_tables.json"), "vision-organism": vision_organism_rows(),
                       "vision-pursuit": vision_pursuit_rows(out / "vision_pursuit.json")})
        if (out / "vision_sinks.json").exists():  # python benchmarks/vision_sinks.py --model vision [wider ...]
            blocks["vision-sinks"] = vision_sinks_rows(out / "vision_sinks.json")
    if args.only in (None, "needle"):
        blocks["needle-control"] = needle_control_rows(out / "needle_control.json")
    for name, body in blocks.items():
        print(f"\n<!-- bench:{name} -->\n{body}\n<!-- bench:{name}:end -->")
    if args.readme:
        write_readme(blocks)
    if args.only in (None, "speed"):  # soft injection's table: written by its own script
        run("soft_injection.py", "--only-print", "--json", str(out / "soft_injection.json"),
            *(["--readme"] if args.readme else []))


if __name__ == "__main__":
    main()
