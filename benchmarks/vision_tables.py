"""The README's vision tables: CHAIR / POPE of the vision organism under greedy decoding, per-input
VHR (the paper's rule), fixed-head VHR (a variant: heads from the 16 probe scenes), VAR by the
paper's rule and by the former first-token rule, against random heads (20 draws, 95 % bootstrap
interval); the outlier filter's effect on the heads chosen.

    python benchmarks/vision_tables.py [--scenes 200 --draws 20 --seed 0] [--json benchmarks/vision_tables.json]

Rendered into the README by ``python benchmarks/run_all.py --only vision --readme``. One thread,
deterministic (greedy decoding, seeded draws).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import torch

from headscope import HeadModel, vision, zoo
from headscope.analyzers.vision import default_layers, select_heads, vision_aware_heads
from headscope.controls import random_control
from headscope.heads import format_heads, same_layer_random_heads
from headscope.interventions import Edit, intervene
from headscope.interventions.kinds.var import apply as var_apply
from headscope.interventions.kinds.var import calibration_inputs, default_tau, var_edit
from headscope.interventions.kinds.vhr import apply as vhr_apply
from headscope.interventions.kinds.vhr import per_layer_count_heads
from headscope.tasks import shapes

METRICS = ("chair_i", "chair_s", "caption_recall", "pope_acc", "pope_f1", "pope_adversarial_f1")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, default=200)
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=str(Path(__file__).with_name("vision_tables.json")))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    start = time.time()
    load_before = os.getloadavg()[0]
    hm = HeadModel.load("vision")
    info = zoo.organism_info("vision")
    scene_seed = info["heldout"]["seed"]
    scenes = shapes.heldout_scenes(args.scenes, scene_seed)
    g = hm.geometry

    def measure(edits=()) -> dict:
        with torch.no_grad(), intervene(hm, list(edits)):
            m = shapes.scene_metrics(hm, scenes)
        return {k: m[k] for k in METRICS}

    rows: dict[str, dict] = {"greedy": {"metrics": measure()}}
    print("greedy", rows["greedy"]["metrics"], flush=True)

    # per-input VHR (the paper's rule), with and without the outlier filter
    for name, filt in (("vhr_per_input", True), ("vhr_per_input_no_filter", False)):
        with torch.no_grad(), vhr_apply(hm, Edit("vhr", [], options={"filter_outliers": filt})) as run:
            m = shapes.scene_metrics(hm, scenes)
        counts = Counter(h for sel in run.selections for h in sel)
        rows[name] = {"metrics": {k: m[k] for k in METRICS}, "selections": len(run.selections),
                      "distinct_sets": len({tuple(sorted(s)) for s in run.selections}),
                      "head_share": {f"L{l}H{h}": round(c / len(run.selections), 4) for (l, h), c in
                                     sorted(counts.items())},
                      "sets": [tuple(sorted(s)) for s in run.selections]}
        print(name, rows[name]["metrics"], flush=True)
    with_f, without_f = rows["vhr_per_input"]["sets"], rows["vhr_per_input_no_filter"]["sets"]
    changed = [i for i, (a, b) in enumerate(zip(with_f, without_f)) if a != b]
    dropped = Counter(h for a, b in zip(with_f, without_f) for h in set(b) - set(a))  # zeroed by the filter
    added = Counter(h for a, b in zip(with_f, without_f) for h in set(a) - set(b))  # chosen in their place
    rows["filter_effect_per_input"] = {"inputs": len(with_f), "changed": len(changed),
                                       "dropped": {format_heads([h]): c for h, c in dropped.most_common()},
                                       "added": {format_heads([h]): c for h, c in added.most_common()}}
    for name in ("vhr_per_input", "vhr_per_input_no_filter"):
        del rows[name]["sets"]

    # fixed heads from the organism's 16 probe scenes (a variant), with and without the filter
    folder = zoo.organism_path("vision")
    pairs = vision.read_pairs(folder / "prompts.jsonl", folder / "images")
    images = [vision.load_image(path) for path, _ in pairs]
    prompts = [prompt for _, prompt in pairs]
    layers = default_layers(g.n_layers)
    for name, filt in (("vhr_fixed", True), ("vhr_fixed_no_filter", False)):
        scores = vision_aware_heads(hm, images, prompts, filter_outliers=filt)
        heads = select_heads(scores)
        rows[name] = {"heads": format_heads(heads), "metrics": measure([Edit("scale", heads, strength=2.0)])}
        print(name, rows[name]["heads"], rows[name]["metrics"], flush=True)

    # VAR: the paper's rule (massive dims from the sink analyzer, tau scaled), and the former rule
    edit = var_edit(hm, calibration_inputs(hm))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad(), var_apply(hm, edit) as run:
            m = shapes.scene_metrics(hm, scenes)
    rows["var_paper"] = {"metrics": {k: m[k] for k in METRICS}, "dims": edit.options["dims"],
                         "tau": default_tau(g.d_model), "visual_sink_layers": run.visual_sink_layers,
                         "rows_edited": run.rows_edited, "warnings": [str(w.message) for w in caught]}
    former = Edit("var", [], options={**edit.options, "rule": "first-token"})
    with torch.no_grad(), var_apply(hm, former) as run:
        m = shapes.scene_metrics(hm, scenes)
    rows["var_first_token"] = {"metrics": {k: m[k] for k in METRICS}, "rows_edited": run.rows_edited,
                               "rows_seen": run.rows_seen}
    print("var", rows["var_paper"]["metrics"], rows["var_first_token"]["metrics"], flush=True)

    # random heads: VHR's count per layer (n_heads // 2 in each chosen layer), the same for both
    template = per_layer_count_heads(layers, g.n_heads)

    def draw(rng):
        heads = same_layer_random_heads(template, g.n_heads, rng, exclude_given=False)
        return measure([Edit("scale", heads, strength=2.0)])

    control = random_control(draw, args.draws, args.seed, lambda i, r: print(f"draw {i}", r, flush=True))
    rows["random"] = control.to_dict()
    rows["verdicts"] = {name: {k: control.verdict(k, rows[name]["metrics"][k], higher_is_better=k not in
                                                  ("chair_i", "chair_s"))
                               for k in METRICS}
                        for name in ("vhr_per_input", "vhr_per_input_no_filter", "vhr_fixed", "vhr_fixed_no_filter")}
    report = {"scenes": args.scenes, "scene_seed": scene_seed, "draws": args.draws, "seed": args.seed,
              "layers": layers, "per_layer": g.n_heads // 2, "rows": rows, "seconds": round(time.time() - start, 1),
              "load_1m": [load_before, os.getloadavg()[0]], "torch": torch.__version__}
    tmp = Path(args.json + ".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(args.json)
    print(f"wrote {args.json} ({report['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
