"""``--task vhd``: vision-aware head divergence (He et al. 2025) of an image-text model.

    headscope score --task vhd --model M --images DIR --prompts FILE --out vhd.csv
    headscope generate --model M --image I --prompt "USER: <image> ..." --vhr vhd.csv

``--prompts``: one prompt per line (each with the image placeholder, paired with every image of
DIR) or JSONL with ``prompt`` and ``image`` columns (image file names inside DIR).
"""

from __future__ import annotations

import argparse

from headscope import vision
from headscope.analyzers.vision import vision_aware_heads
from headscope.cli.registry import register_task
from headscope.validate import number_list


@register_task("vhd", default_model="vision")
def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--images", required=command == "score", help="folder of PNG/JPEG images")
    parser.add_argument("--prompts", required=command == "score",
                        help="prompts: one per line (with <image>) or JSONL with prompt and image columns")
    parser.add_argument("--layers", type=number_list(int), default=None,
                        help="comma-separated layers where VHR selects heads (default: the last 14/32 of them)")
    parser.add_argument("--squared", action="store_true", help="squared L2 distance (one port's variant)")
    parser.add_argument("--no-filter", action="store_true", help="skip the per-layer outlier filter")


def _inputs(args) -> tuple[list, list[str]]:
    """The images and prompts of --images / --prompts, each file read and checked."""
    pairs = vision.read_pairs(args.prompts, args.images)
    return [vision.load_image(path) for path, _ in pairs], [prompt for _, prompt in pairs]


def check(args) -> None:
    if args.command == "score":  # eval --task vhd has no metric (its error comes next)
        _inputs(args)


def score(args, hm):
    vision.require_vision(hm, "--task vhd")
    images, prompts = _inputs(args)
    return vision_aware_heads(hm, images, prompts, squared=args.squared, filter_outliers=not args.no_filter,
                              layers=args.layers, batch_size=args.batch_size, progress=not args.quiet)
