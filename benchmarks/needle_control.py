"""The retrieval organism's needle ablation against random heads: the top-3 retrieval heads ablated,
against 3 random other heads (20 draws, mean and 95 % bootstrap interval; the same draws as
``headscope eval --task needle --random 3 --exclude ranking.csv --top 3 --seed 0``).

    python benchmarks/needle_control.py [--top 3 --draws 20 --seed 0] [--json benchmarks/needle_control.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from headscope.cli import main as cli
from headscope.controls import Control


def run(argv: list[str]) -> list[str]:
    """``headscope ARGV`` in this process; its stdout lines."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli(argv) == 0, argv
    return out.getvalue().splitlines()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--top", type=int, default=3)
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=str(Path(__file__).with_name("needle_control.json")))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    start, load = time.time(), os.getloadavg()[0]
    top = str(args.top)
    with tempfile.TemporaryDirectory() as tmp:
        ranking = str(Path(tmp) / "ranking.csv")
        run(["score", "--task", "needle", "--out", ranking, "--quiet"])
        base = float(run(["eval", "--task", "needle", "--quiet"])[-1].split()[1])
        lines = run(["eval", "--task", "needle", "--ablate", ranking, "--top", top, "--quiet"])
        heads, ablated = lines[0].split(": ", 1)[1], float(lines[-1].split()[1])
        lines = run(["eval", "--task", "needle", "--random", top, "--exclude", ranking, "--top", top, "--seed",
                     str(args.seed), "--draws", str(args.draws), "--quiet"])
    values = [{"accuracy": float(line.rsplit(" ", 1)[1])} for line in lines if line.startswith("draw ")]
    control = Control.from_draws(values, args.seed)
    report = {"top": heads, "base": base, "ablated": ablated, "random": control.to_dict(),
              "verdict": control.verdict("accuracy", ablated, higher_is_better=False),
              "seconds": round(time.time() - start, 1), "load_1m": [load, os.getloadavg()[0]]}
    tmp = Path(args.json + ".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(args.json)
    print(json.dumps({k: v for k, v in report.items() if k != "random"}, indent=1), control.cell("accuracy"))
    return 0

if __name__ == "__main__":
    sys.exit(main())
