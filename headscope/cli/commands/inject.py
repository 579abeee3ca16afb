"""``headscope inject fit``: a task embedding and its learned soft head selection (Park & Rhee 2025).

    headscope inject fit --model M --task FILE.jsonl --shots 10 --out task.safetensors

Writes one safetensors file (the mean head outputs m, the learned alphas, and a JSON header with the
model, task, k, N, template and seed) for ``headscope eval --task icl --inject`` and ``headscope
generate --inject``; ``--scores CSV`` also exports the alphas as a head ranking.
"""

from __future__ import annotations

import argparse

from headscope.cli.common import add_device_arguments, load_model
from headscope.cli.tasks.icl import add_prompt_arguments, prompt_format
from headscope.errors import HeadscopeError
from headscope.methods.soft_injection import fit_soft_selection, task_embedding
from headscope.tasks.icl import IclTask
from headscope.validate import positive_int

NAME = "inject"
HELP = "fit a task embedding and its soft head selection (soft injection)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="inject_command", required=True)
    fit = sub.add_parser("fit", help="task embedding (mean z at the last token of k-shot prompts) + learned alphas")
    fit.add_argument("--model", default="icl", help="shipped organism, local folder or hub id")
    fit.add_argument("--task", required=True, metavar="FILE", help="task JSONL of {input, output} pairs")
    fit.add_argument("--out", required=True, help="the task embedding file to write (.safetensors)")
    fit.add_argument("--shots", type=positive_int, default=10, help="demonstrations per prompt for the embedding [10]")
    fit.add_argument("--prompts", type=positive_int, default=50, help="N, k-shot prompts averaged [50]")
    fit.add_argument("--steps", type=positive_int, default=400, help="Adam steps on theta [400]")
    fit.add_argument("--lr", type=float, default=0.2, help="Adam learning rate (> 0) [0.2]")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--scores", metavar="CSV", help="also write the alphas as a head ranking CSV")
    add_device_arguments(fit)
    fit.add_argument("--dtype", default="float32")
    fit.add_argument("--batch-size", type=positive_int, default=8)
    fit.add_argument("--quiet", action="store_true")
    add_prompt_arguments(fit)


def run(args) -> int:
    if args.lr <= 0:
        raise HeadscopeError(f"--lr must be > 0; got {args.lr:g}")
    if args.lr > 3.4028234663852886e38:  # float32.max: Adam computes in float32, the step would be infinite
        raise HeadscopeError(f"--lr {args.lr:g} is beyond float32's range (<= 3.4e+38); give a smaller rate")
    task = IclTask.load(args.task, seed=args.split_seed)
    task.check_shots(args.shots + 1)
    fmt = prompt_format(args)
    hm = load_model(args)
    emb = task_embedding(hm, task, k=args.shots, n=args.prompts, fmt=fmt, seed=args.seed,
                         batch_size=args.batch_size, progress=not args.quiet)
    emb = fit_soft_selection(hm, task, emb, steps=args.steps, lr=args.lr, fmt=fmt, seed=args.seed,
                             progress=not args.quiet)
    emb.save(args.out)
    m = emb.meta
    print(f"{hm}\ntask {task.name}: {len(task['train'])} train / {len(task['val'])} val / {len(task['test'])} test pairs")
    print(f"best validation step {m['best_step']}: 0-shot + injection accuracy {m['val_accuracy']:.3f} "
          f"(fit {m['fit_seconds']:.1f} s); mean alpha {float(emb.alphas.mean()):.3f}")
    scores = emb.scores()
    print(scores.to_frame().head(8).to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    if args.scores:
        scores.to_csv(args.scores)
    print(f"wrote {args.out}")
    return 0
