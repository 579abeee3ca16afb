"""Head pursuit on the vision organism (Basile et al. 2025): rank heads for a visual concept (the
organism's colours, its shapes) by SOMP over their image-token writes, suppress the top heads in
captioning (z x alpha, alpha = -1) and compare with random heads (same count per layer, 20 draws,
mean and 95 % bootstrap interval: ``headscope.controls.random_control``).

    python benchmarks/vision_pursuit.py [--scenes 200 --top 1 2 --draws 20] [--out benchmarks/vision_pursuit.json]

The effect is measured teacher-forced on held-out typical scenes: how often the caption's first
object's colour (after "a") or shape (after "a <colour>") is named right, among that attribute's
words (``headscope.tasks.shapes.first_object_accuracy``). A head that carries the concept should
lower its own attribute's accuracy when suppressed, more than random heads do, and leave the other
attribute alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from headscope import HeadModel
from headscope.analyzers.pursuit import concept_token_ids, same_layer_random_heads, scale_heads
from headscope.analyzers.vision import image_head_pursuit
from headscope.controls import random_control
from headscope.tasks import shapes


def measure(hm, scenes, heads, alpha):
    """Colour and kind accuracy with ``heads`` scaled by alpha (no heads: the plain model)."""
    g = hm.geometry
    with hm.edit_z(scale_heads(heads, alpha, g.n_layers, g.n_heads)):
        return {attr: shapes.first_object_accuracy(hm, scenes, attr) for attr in ("colour", "kind")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, default=200)
    ap.add_argument("--fit-scenes", type=int, default=64, help="scenes the pursuit is fitted on (a separate seed)")
    ap.add_argument("--top", type=int, nargs="+", default=[1, 2], help="heads edited (1 = about 1%% of 32 ... 3%%)")
    ap.add_argument("--alpha", type=float, default=-1.0)
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).with_name("vision_pursuit.json")))
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    start = time.time()
    hm = HeadModel.load("vision")
    tok = hm.processor.tokenizer
    fit = shapes.heldout_scenes(args.fit_scenes, seed=7, partner_absent=False)
    test = shapes.heldout_scenes(args.scenes, seed=8, partner_absent=False)
    concepts = {"colour": list(shapes.COLOURS), "kind": list(shapes.KINDS)}
    base = measure(hm, test, [], 1.0)
    rows = {"base": base, "concepts": {}}
    for concept, words in concepts.items():
        ids = concept_token_ids(tok, words, with_space=False)
        scores = image_head_pursuit(hm, [s.image() for s in fit], [shapes.CAPTION_PROMPT] * len(fit), ids,
                                    k=len(ids))
        entry = {"ranking": [f"L{l}H{h}" for l, h in scores.top(5)], "edits": {}}
        for top in args.top:
            heads = scores.top(top)
            edited = measure(hm, test, heads, args.alpha)

            def draw(rng, heads=heads):
                m = measure(hm, test, same_layer_random_heads(heads, hm.geometry.n_heads, rng), args.alpha)
                return {attr: m[attr]["accuracy"] for attr in ("colour", "kind")}

            control = random_control(draw, args.draws, args.seed)
            entry["edits"][top] = {
                "heads": [f"L{l}H{h}" for l, h in heads], "edited": edited, "random": control.to_dict(),
                "verdict": {attr: control.verdict(attr, edited[attr]["accuracy"], higher_is_better=False)
                            for attr in ("colour", "kind")}}
        rows["concepts"][concept] = entry
    rows.update({"alpha": args.alpha, "scenes": args.scenes, "fit_scenes": args.fit_scenes, "draws": args.draws,
                 "seconds": round(time.time() - start, 1), "loadavg": os.getloadavg()})
    tmp = Path(args.out + ".tmp")
    tmp.write_text(json.dumps(rows, indent=1) + "\n")
    tmp.replace(args.out)
    print(f"base: colour accuracy {base['colour']['accuracy']:.3f}, shape accuracy {base['kind']['accuracy']:.3f}")
    for concept, entry in rows["concepts"].items():
        for top, e in entry["edits"].items():
            print(concept, ",".join(e["heads"]), {a: (e["edited"][a]["accuracy"], e["random"]["interval"][a],
                                                     e["verdict"][a]) for a in ("colour", "kind")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
