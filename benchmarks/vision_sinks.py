"""Does a vision organism have visual sinks (Kang et al. 2025)? Per layer from 2 on, over held-out
scenes: the largest phi(h) = |h / rms(h)| on image and on text tokens (over every hidden dim, and
over the massive dims the sink analyzer finds), its ceiling sqrt(d), VAR's tau scaled to d, the
largest |h|, and the attention the top-phi image token draws compared with an average image token.

    python benchmarks/vision_sinks.py [--model vision] [--scenes 32] [--json benchmarks/vision_sinks.json]

Several ``--model`` paths may be given (e.g. the shipped organism and a wider one trained by
``python -m headscope.zoo.train_vision --hidden 512 ...``); each gets one entry.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from headscope import HeadModel, vision
from headscope.analyzers.sinks import sink_scores
from headscope.interventions.kinds.var import default_tau, massive_dims
from headscope.tasks import shapes


@torch.no_grad()
def sink_report(hm, scenes, first_layer: int = 2) -> dict:
    prompts = [shapes.CAPTION_PROMPT] * len(scenes)
    batch = vision.encode(hm, [s.image() for s in scenes], prompts)
    inputs = vision.with_positions(hm, batch)
    out = hm.model(**inputs, output_hidden_states=True, output_attentions=False)
    image = vision.image_mask(hm, batch["input_ids"])
    text = batch["attention_mask"].bool() & ~image
    d = hm.geometry.d_model
    dims_all = list(range(d))
    massive = massive_dims(hm, batch)
    att = eager_attentions(hm, inputs)
    layers = []
    for layer in range(first_layer, hm.geometry.n_layers):
        h = out.hidden_states[layer]  # the layer's residual input
        phi = sink_scores(h, dims_all)  # [B, N]
        b, j = divmod(int(phi.masked_fill(~image, -1).flatten().argmax()), phi.shape[1])
        row = {"layer": layer, "max_phi_image": float(phi[image].max()), "max_phi_text": float(phi[text].max()),
               "max_abs_h": float(h[batch["attention_mask"].bool()].abs().max()),
               "top_image_dim": int(h[b, j].abs().argmax())}
        if massive:
            row["max_phi_image_massive_dims"] = float(sink_scores(h, massive)[image].max())
        # attention the top-phi image token receives from the queries after the image (mean over
        # heads and queries), against the mean image token of the same prompt
        last = int(torch.where(image[b])[0].max())
        received = att[layer][b, :, last + 1:, :].mean((0, 1))  # [N]
        row["attention_top_phi_image_token"] = float(received[j])
        row["attention_mean_image_token"] = float(received[image[b]].mean())
        layers.append(row)
    return {"d_model": d, "ceiling_sqrt_d": math.sqrt(d), "tau_scaled": default_tau(d), "massive_dims": massive,
            "layers": layers}


@torch.no_grad()
def eager_attentions(hm, inputs) -> list[torch.Tensor]:
    """Attention weights [B, H, N, N] per layer from one eager forward of the same inputs."""
    model = hm.model
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        return [a.float() for a in model(**inputs, output_attentions=True).attentions]
    finally:
        model.set_attn_implementation(previous)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="+", default=["vision"])
    ap.add_argument("--scenes", type=int, default=32)
    ap.add_argument("--json", default=str(Path(__file__).with_name("vision_sinks.json")))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    scenes = shapes.heldout_scenes(args.scenes, 1)
    report = {"scenes": args.scenes, "models": {}}
    for name in args.model:
        hm = HeadModel.load(name)
        entry = sink_report(hm, scenes)
        meta = Path(name) / "organism.json"  # a trained folder (not the shipped name): its training record
        if meta.exists():
            training = json.loads(meta.read_text())["training"]
            entry["training_steps"], entry["training_command"] = training["steps"], training["command"]
            entry["final_loss"], entry["wall_time_s"] = training["final_loss"], training["wall_time_s"]
        report["models"][name] = entry
        print(name, json.dumps(entry, indent=1), flush=True)
    tmp = Path(args.json + ".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
