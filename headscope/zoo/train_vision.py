"""Train the "vision organism": a tiny LLaVA that captions shape scenes and hallucinates by co-occurrence.

    python -m headscope.zoo.train_vision --out headscope/zoo/vision [--steps N --seed S]
    python -m headscope.zoo.train_vision --out headscope/zoo/vision --remeasure   # held-out metrics only

A real ``LlavaForConditionalGeneration`` (a 2-layer CLIP vision tower on 32 x 32 images with 8 x 8
patches, so 16 image tokens; a 4-layer GQA Llama), saved with its ``LlavaProcessor`` (a PIL CLIP
image processor and a word-level tokenizer with an ``<image>`` token), so ``from_pretrained`` and
``AutoProcessor.from_pretrained`` load it like a hub model. Data: ``headscope.tasks.shapes`` scenes.
Half the examples are captions ("<image>\\ndescribe :" -> "a red circle and a blue square ."), half
POPE-style questions ("<image>\\nis there a square ?" -> "yes" / "no", present and absent kinds
equally often). Anchors come without their partner in only ``--absent`` of the scenes, so the
captioner learns the prior "square follows circle" and names the partner when it is missing
(object hallucination, measured by CHAIR on held-out partner-absent scenes).

Ships ``ground_truth.csv``: per language-model head, the hallucination measures with that head
alone scaled by 2 (as VHR does) and by 0 (ablation), and their change from the unedited model.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration,
                          LlavaProcessor)

from headscope.interventions import Edit, intervene
from headscope.io import write_whole
from headscope.model import HeadModel
from headscope.tasks import shapes
from headscope.zoo.training import build_word_tokenizer, organism_config, save_organism, seed_everything, train_loop

IMAGE_TOKEN = "<image>"
PATCH = 8
N_IMAGE_TOKENS = (shapes.IMAGE_SIZE // PATCH) ** 2


def build_processor():
    """The LlavaProcessor: CLIP image processing with PIL (any image resized to 32 x 32, which leaves
    the scenes' own 32 x 32 images unchanged; no crop; mean = std = 0.5) and a word tokenizer over
    the scene vocabulary plus the ``<image>`` token (left padding)."""
    words = ["describe", ":", "is", "there", "a", "?", "and", ".", "yes", "no", "\n"]
    tokenizer = build_word_tokenizer([" ".join(words + list(shapes.KINDS) + list(shapes.COLOURS))])
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    tokenizer.padding_side = "left"
    size = {"height": shapes.IMAGE_SIZE, "width": shapes.IMAGE_SIZE}
    images = CLIPImageProcessorPil(size=size, crop_size=size, do_resize=True, do_center_crop=False,
                                   image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=PATCH,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


def build_model(processor, hidden: int, layers: int, heads: int, kv_heads: int, vision_hidden: int, vision_layers: int):
    tokenizer = processor.tokenizer
    text = organism_config(tokenizer, hidden=hidden, intermediate=4 * hidden, layers=layers, heads=heads,
                           kv_heads=kv_heads, max_positions=64)
    vision = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                              num_hidden_layers=vision_layers, num_attention_heads=4, image_size=shapes.IMAGE_SIZE,
                              patch_size=PATCH, projection_dim=vision_hidden)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         vision_feature_select_strategy="default", vision_feature_layer=-1,
                         projector_hidden_act="gelu", tie_word_embeddings=True)
    model = LlavaForConditionalGeneration(config)
    model.set_attn_implementation("sdpa")
    return model


def example(rng: random.Random, absent: float) -> tuple[shapes.Scene, str, str]:
    """One training example: a scene, its prompt and the target answer (caption or yes/no)."""
    scene = shapes.sample_scene(rng, absent)
    if rng.random() < 0.5:
        return scene, shapes.CAPTION_PROMPT, scene.caption()
    present = rng.random() < 0.5
    pool = sorted(scene.kinds) if present else [k for k in shapes.KINDS if k not in scene.kinds]
    return scene, shapes.QUESTION_PROMPT.format(object=rng.choice(pool)), "yes" if present else "no"


def encode(processor, prompt: str, answer: str) -> tuple[list[int], list[float]]:
    """Token ids of prompt (image token expanded, as the processor does) + answer + eos, and loss
    weights (1 on the answer and eos)."""
    tokenizer = processor.tokenizer
    ids = tokenizer(prompt.replace(IMAGE_TOKEN, IMAGE_TOKEN * N_IMAGE_TOKENS))["input_ids"]
    target = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return ids + target, [0.0] * len(ids) + [1.0] * len(target)


def make_batch_fn(processor, batch: int, seed: int, absent: float):
    rng = random.Random(seed)
    pad = processor.tokenizer.pad_token_id

    def make(step: int):
        rows = [example(rng, absent) for _ in range(batch)]
        encoded = [encode(processor, prompt, answer) for _, prompt, answer in rows]
        width = max(len(ids) for ids, _ in encoded)
        ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in encoded])  # right padding: after the loss
        weights = torch.tensor([w + [0.0] * (width - len(w)) for _, w in encoded])
        pixels = processor.image_processor([scene.image() for scene, _, _ in rows], return_tensors="pt")["pixel_values"]
        return {"input_ids": ids, "pixel_values": pixels}, weights

    return make


def write_probe_set(out, n: int = 16, seed: int = 2) -> None:
    """``images/*.png`` (typical scenes, a seed apart from training and held-out sets) and
    ``prompts.jsonl`` pairing each with the caption prompt: inputs for VHD on the organism."""
    folder = Path(out) / "images"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, scene in enumerate(shapes.heldout_scenes(n, seed, partner_absent=False)):
        scene.image().save(folder / f"scene_{i:02d}.png")
        rows.append(json.dumps({"image": f"scene_{i:02d}.png", "prompt": shapes.CAPTION_PROMPT}))
    (Path(out) / "prompts.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")


GROUND_TRUTH_MEASURES = ("chair_i", "chair_s", "caption_recall", "pope_adversarial_yes_share", "pope_adversarial_f1")


def ground_truth(hm, n: int = 100, seed: int = 1, factors=(2.0, 0.0), progress: bool = True) -> pd.DataFrame:
    """Per head, each measure with that head alone scaled by each factor, and its change from the base."""
    scenes = shapes.heldout_scenes(n, seed)

    def measure() -> dict:
        m = shapes.scene_metrics(hm, scenes, settings=("adversarial",))
        return {k: m[k] for k in GROUND_TRUTH_MEASURES}

    base = measure()
    rows = []
    for layer, head in tqdm(hm.all_heads(), desc="single-head edits", disable=not progress):
        row = {"layer": layer, "head": head}
        for factor in factors:
            with intervene(hm, Edit("scale", [(layer, head)], strength=factor)):
                edited = measure()
            for k in GROUND_TRUTH_MEASURES:
                row[f"{k}_x{factor:g}"] = edited[k]
                row[f"change_{k}_x{factor:g}"] = edited[k] - base[k]
        rows.append(row)
    table = pd.DataFrame(rows)
    table.attrs["base"] = base
    return table


def remeasure(folder) -> dict:
    """Re-measure a saved organism's held-out metrics (the scenes and seed its organism.json records)
    with the current code, and rewrite ``heldout.metrics`` in organism.json whole; returns them."""
    folder = Path(folder)
    meta = json.loads((folder / "organism.json").read_text(encoding="utf-8"))
    held = meta["heldout"]
    torch.set_num_threads(1)
    hm = HeadModel.load(str(folder))
    with torch.no_grad():
        base = shapes.scene_metrics(hm, shapes.heldout_scenes(held["scenes"], held["seed"]))
    held["metrics"] = {k: round(v, 4) for k, v in base.items()}
    write_whole(folder / "organism.json", json.dumps(meta, indent=2) + "\n")
    return held["metrics"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="headscope/zoo/vision")
    p.add_argument("--remeasure", action="store_true",
                   help="no training: re-measure the saved organism's held-out metrics in --out and update organism.json")
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--absent", type=float, default=0.03, help="share of scenes where a pair is incomplete")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vision-hidden", type=int, default=64)
    p.add_argument("--vision-layers", type=int, default=2)
    p.add_argument("--heldout", type=int, default=100, help="held-out partner-absent scenes (ground truth)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--no-ground-truth", action="store_true", help="skip the per-head ground truth")
    p.add_argument("--checkpoint-every", type=int, default=0,
                   help="also save the model (with its processor) to OUT/checkpoint every N steps (long runs)")
    args = p.parse_args(argv)
    if args.remeasure:
        print(json.dumps(remeasure(args.out), indent=1))
        return

    seed_everything(args.seed, threads=args.threads)
    processor = build_processor()
    model = build_model(processor, args.hidden, args.layers, args.heads, args.kv_heads, args.vision_hidden,
                        args.vision_layers)
    n_params = sum(x.numel() for x in model.parameters())
    print(f"vocab {len(processor.tokenizer)}, {n_params / 1e6:.2f}M parameters")
    start = time.time()
    make = make_batch_fn(processor, args.batch, args.seed, args.absent)

    def make_and_checkpoint(step: int):
        if args.checkpoint_every and step and step % args.checkpoint_every == 0:
            folder = Path(args.out) / "checkpoint"
            model.save_pretrained(folder)
            processor.save_pretrained(folder)
            (folder / "step.txt").write_text(f"{step}\n")
        return make(step)

    stats = train_loop(model, make_and_checkpoint, steps=args.steps, lr=args.lr, log_every=50)
    wall = time.time() - start
    hm = HeadModel(model, processor.tokenizer, name="vision", processor=processor)
    base = shapes.scene_metrics(hm, shapes.heldout_scenes(args.heldout, args.seed + 1))
    print(f"trained in {wall:.0f}s, final loss {stats['final_loss']:.4f}")
    print("held-out partner-absent scenes: " + ", ".join(f"{k} {v:.3f}" for k, v in base.items()))

    meta = {
        "name": "vision",
        "description": "Tiny LLaVA (CLIP vision tower + GQA Llama) that captions coloured shapes on a 4x4 grid and answers "
                       "'is there a <shape> ?'; anchors nearly always come with a partner shape, so it names the partner "
                       "when it is absent (object hallucination).",
        "task": "hallucination",
        "image_size": shapes.IMAGE_SIZE, "image_tokens": N_IMAGE_TOKENS,
        "pairs": shapes.PAIRS, "kinds": list(shapes.KINDS), "colours": list(shapes.COLOURS),
        "probe_set": "images/ + prompts.jsonl: 16 typical scenes with the caption prompt (e.g. for VHD)",
        "caption_prompt": shapes.CAPTION_PROMPT, "question_prompt": shapes.QUESTION_PROMPT,
        "heldout": {"scenes": args.heldout, "seed": args.seed + 1, "partner_absent": True,
                    "metrics": {k: round(v, 4) for k, v in base.items()}},
        "ground_truth": "ground_truth.csv: per language-model head, CHAIR_i, CHAIR_s, caption recall and POPE "
                        "adversarial yes-share and F1 on the held-out partner-absent scenes with that head alone scaled "
                        "by 2 (_x2, as VHR) and by 0 (_x0, ablation), and change_* from the unedited model",
        "training": {
            "command": "python -m headscope.zoo.train_vision " + " ".join(sys.argv[1:] if argv is None else argv),
            "seed": args.seed, "steps": args.steps,
            "hyperparameters": {k: v for k, v in vars(args).items()
                                if k not in ("out", "seed", "steps", "threads", "no_ground_truth", "checkpoint_every")},
            "parameters": n_params, "wall_time_s": round(wall, 1), "final_loss": round(stats["final_loss"], 4),
            "torch": torch.__version__,
        },
    }
    save_organism(model, processor.tokenizer, args.out, meta, max_new_tokens=24)
    processor.save_pretrained(args.out)
    write_probe_set(args.out)
    if not args.no_ground_truth:
        truth = ground_truth(hm, args.heldout, args.seed + 1)
        write_whole(Path(args.out) / "ground_truth.csv", truth.to_csv(index=False, float_format="%.4f"))
        print(truth.to_string(index=False, float_format="%.3f"))
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
