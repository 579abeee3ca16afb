"""generate() with VAR (Kang et al. 2025) against plain SDPA generate().

A random-init LLaVA-shaped model (CLIP tower at 336 px / patch 14 = 576 image tokens, Llama with
GQA) and a ~2K-token prompt (system text, the image, a short question), greedy, --new tokens; and
the vision organism when it is shipped (``--organism vision``). Runs alternate between the two
methods, --repeats times each; prints best and median wall time, their ratio, and the 1-minute
load average before and after (the box is shared). Figures go to benchmarks/var_generate.json.

    python benchmarks/var_generate.py [--tokens 2048] [--new 32] [--repeats 3] [--organism vision]
"""

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from headscope import HeadModel, vision, zoo
from headscope.interventions import Edit, intervene
from headscope.interventions.kinds.var import massive_dims
from headscope.zoo.random_vlm import WORDS, random_llava


def timed(fns: dict, repeats: int) -> dict:
    """Wall times per method, runs interleaved so both see the same machine load."""
    for fn in fns.values():
        fn()  # warm-up
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def case(hm, batch, new: int, repeats: int, options: dict) -> dict:
    dims = massive_dims(hm, batch)
    # rule "first-token": BOS is a sink in every layer, so VAR redistributes (what this benchmark times)
    # whether or not the model has visual sinks; by the paper's rule it is a no-op where it has none
    edit = Edit("var", [], options={"dims": dims or options["dims"], "tau": options["tau"] if not dims else 20.0,
                                    "rule": "first-token"})
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=vision.pad_id(hm))
    rows_edited = []

    def plain():
        with torch.no_grad():
            hm.model.generate(**batch, **kwargs)

    def var():
        with torch.no_grad(), intervene(hm, edit):
            hm.model.generate(**batch, **kwargs)

    times = timed({"sdpa": plain, "var": var}, repeats)
    from headscope.interventions.kinds.var import apply

    with torch.no_grad(), apply(hm, edit) as run:
        hm.model.generate(**batch, **kwargs)
    rows_edited.append(run.rows_edited / max(run.rows_seen, 1))
    out = {"repeats": repeats, "tokens": int(batch["input_ids"].shape[1]), "image_tokens": int(vision.image_mask(hm, batch["input_ids"]).sum()),
           "new_tokens": new, "massive_dims": dims, "var_dims_used": edit.options["dims"],
           "share_of_rows_redistributed": rows_edited[0]}
    for name, ts in times.items():
        out[f"{name}_best_s"] = min(ts)
        out[f"{name}_median_s"] = statistics.median(ts)
    out["ratio_best"] = out["var_best_s"] / out["sdpa_best_s"]
    out["ratio_median"] = out["var_median_s"] / out["sdpa_median_s"]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--organism", default=None, help="also time this shipped image-text organism (e.g. vision)")
    ap.add_argument("--json", default=str(Path(__file__).with_name("var_generate.json")))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = random_llava(tmp, layers=4, hidden=256, heads=8, kv_heads=2, image_size=336, patch_size=14,
                            vision_hidden=64, max_positions=4096)
        hm = HeadModel.load(path)
        words = [w for w in WORDS if not w.startswith("<")]
        question = "USER: <image> is there a red square in the image ? ASSISTANT:"
        n_text = args.tokens - 576 - len(question.split()) + 1
        system = " ".join(words[i % len(words)] for i in range(n_text))
        batch = vision.encode(hm, [Image.new("RGB", (336, 336), (90, 140, 200))], [system + " " + question])
        # random init has no massive activations: two dims and a low tau stand in (same cost)
        results["random_llava_2k"] = case(hm, batch, args.new, args.repeats, {"dims": [0, 1], "tau": 3.0})
    if args.organism:
        if zoo.organism_path(args.organism) is None:
            raise SystemExit(f"organism {args.organism!r} is not shipped here")
        hm = HeadModel.load(args.organism)
        info = zoo.organism_info(args.organism)
        prompt = info.get("caption_prompt", "USER: <image> describe ASSISTANT:")
        batch = vision.encode(hm, [Image.new("RGB", (64, 64), (200, 40, 40))], [prompt])
        results[args.organism] = case(hm, batch, args.new, args.repeats, {"dims": [0, 1], "tau": 3.0})
    results["loadavg_1min_before"] = load_before
    results["loadavg_1min_after"] = os.getloadavg()[0]
    results["threads"] = torch.get_num_threads()
    for name, r in results.items():
        if isinstance(r, dict):
            print(f"{name}: {r['tokens']} tokens ({r['image_tokens']} image), {r['new_tokens']} new: "
                  f"sdpa best {r['sdpa_best_s']:.3f}s median {r['sdpa_median_s']:.3f}s | var best {r['var_best_s']:.3f}s "
                  f"median {r['var_median_s']:.3f}s | ratio best {r['ratio_best']:.2f} median {r['ratio_median']:.2f}")
    print(f"load average: {load_before:.2f} -> {results['loadavg_1min_after']:.2f}")
    tmp = Path(args.json).with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
