"""Image-text inputs for vision-language models (LLaVA and other image-text-to-text families).

Where the image sits in each prompt of a batch comes from the config's image token id (the
processor expands one ``<image>`` placeholder into as many image tokens as the vision tower makes),
never from a fixed position. Named key groups per prompt:

- ``image``: positions holding image tokens;
- ``text_after_image``: real (non-padding) tokens after the last image token;
- ``text_before_image``: real tokens before the first image token;
- ``sinks``: from VAR's visual-sink test (``headscope.interventions.kinds.var``), not here.

Images are read with PIL only (slow image processors; no torchvision needed). An image of more than
``MAX_IMAGE_PIXELS`` (8192 x 8192) pixels is refused from its header, before it is decoded (a
decompression bomb: a small file that decodes to gigabytes)::

    batch = encode(hm, [load_image("cat.png")], ["USER: <image>\\nDescribe the image. ASSISTANT:"])
    groups = token_groups(hm, batch["input_ids"], batch["attention_mask"])
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, UnidentifiedImageError

from headscope.data import json_kind, read_jsonl
from headscope.errors import HeadscopeError
from headscope.hf import inputs
from headscope.hf.inputs import image_token_id
from headscope.validate import read_text

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
MAX_IMAGE_PIXELS = 8192 * 8192  # larger images are refused before decoding (vision towers resize to ~336 px)


def is_vision_model(hm) -> bool:
    return hasattr(hm.model.config, "vision_config") and image_token_id(hm.model.config) is not None


def require_vision(hm, what: str) -> int:
    """The image token id, or a clear error for a text-only model."""
    token = image_token_id(hm.model.config)
    if not hasattr(hm.model.config, "vision_config") or token is None:
        raise HeadscopeError(
            f"{what} needs a vision-language model (e.g. LlavaForConditionalGeneration) with an image token; "
            f"{hm.name} ({type(hm.model).__name__}) is text-only. Pass --model with an image-text model folder"
        )
    return token


# ----------------------------------------------------------------------------------- files
def load_image(path: str | Path):
    """An RGB PIL image, or a clear error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise HeadscopeError(f"image {path} does not exist; pass a PNG or JPEG file")
    too_big = (f"image {path} is larger than {MAX_IMAGE_PIXELS:,} pixels (8192 x 8192; headscope.vision."
               "MAX_IMAGE_PIXELS), a possible decompression bomb; resize it")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL's own limit, from the header
            img = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise HeadscopeError(too_big) from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise HeadscopeError(f"cannot read image {path} ({type(exc).__name__}); pass a valid PNG or JPEG file") from None
    with img:
        if img.width * img.height > MAX_IMAGE_PIXELS:
            raise HeadscopeError(too_big)
        try:
            return img.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise HeadscopeError(f"cannot read image {path} ({type(exc).__name__}); pass a valid PNG or JPEG "
                                 "file") from None


def image_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise HeadscopeError(f"--images {folder} is not a folder; pass a folder of PNG/JPEG files")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise HeadscopeError(f"{folder} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def read_pairs(prompts_file: str | Path, images_dir: str | Path) -> list[tuple[Path, str]]:
    """(image path, prompt) pairs: JSONL (or a JSON array) of objects with ``prompt`` and ``image``
    (image relative to the folder), or plain text with one prompt per line, paired with every image
    of the folder. Which one is told by the content; a .json / .jsonl name must hold JSON."""
    path = Path(prompts_file)
    text = read_text(path, "prompts file")
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise HeadscopeError(f"prompts file {path} is empty; give one prompt per line")
    if json_kind(text) is not None or path.suffix.lower() in (".json", ".jsonl"):
        pairs = []
        hint = 'each line should be {"image": "file.png", "prompt": "... <image> ..."}'
        for lineno, row in read_jsonl(path, "prompts file", hint):
            if not isinstance(row, dict) or not all(isinstance(row.get(k), str) and row[k] for k in ("prompt", "image")):
                raise HeadscopeError(f"{path}:{lineno} lacks a 'prompt' or 'image' text; {hint}")
            pairs.append((Path(images_dir) / row["image"], row["prompt"]))
        return pairs
    return [(image, prompt) for image in image_files(images_dir) for prompt in lines]


# ----------------------------------------------------------------------------------- encoding
def placeholder(hm) -> str:
    processor = getattr(hm, "processor", None)
    return getattr(processor, "image_token", None) or "<image>"


def encode(hm, images: Sequence, prompts: Sequence[str]) -> dict:
    """Processor outputs for (image, prompt) pairs, left-padded (for generation), on the model's device.

    Each prompt must hold the image placeholder once (e.g. ``<image>`` for LLaVA)."""
    require_vision(hm, "image inputs")
    processor = getattr(hm, "processor", None)
    if processor is None:
        raise HeadscopeError(f"{hm.name} was loaded without a processor; load the model folder with "
                             "HeadModel.load(folder) where the folder holds processor_config.json")
    if len(images) != len(prompts):
        raise HeadscopeError(f"got {len(images)} images for {len(prompts)} prompts; give one image per prompt")
    mark = placeholder(hm)
    for prompt in prompts:
        if prompt.count(mark) != 1:
            raise HeadscopeError(f"prompt {prompt[:60]!r} must contain the image placeholder {mark!r} exactly once; "
                                 f"add it where the image goes, e.g. 'USER: {mark}\\nDescribe the image. ASSISTANT:'")
    images = [load_image(i) if isinstance(i, (str, Path)) else i for i in images]
    tok = processor.tokenizer
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        batch = processor(images=list(images), text=list(prompts), return_tensors="pt", padding=True)
    finally:
        tok.padding_side = side
    return {k: v.to(hm.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def image_mask(hm, input_ids: torch.Tensor) -> torch.Tensor:
    """Bool [B, N]: True where input_ids holds the image token."""
    return torch.as_tensor(input_ids) == require_vision(hm, "image positions")


def token_groups(hm, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Bool [B, N] masks per prompt: ``image``, ``text_after_image``, ``text_before_image``."""
    image = image_mask(hm, input_ids)
    real = torch.ones_like(image) if attention_mask is None else torch.as_tensor(attention_mask).bool()
    pos = torch.arange(image.shape[1], device=image.device).expand_as(image)
    big = image.shape[1]
    last = torch.where(image, pos, torch.full_like(pos, -1)).amax(1, keepdim=True)
    first = torch.where(image, pos, torch.full_like(pos, big)).amin(1, keepdim=True)
    return {
        "image": image,
        "text_after_image": real & (pos > last) & (last >= 0),
        "text_before_image": real & (pos < first),
    }


def key_groups(hm, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               names: Sequence[str] = ("image", "text_after_image")) -> torch.Tensor:
    """Int [B, N] group ids for ``attention_stats(key_groups=...)``: i for the i-th name, -1 elsewhere."""
    masks = token_groups(hm, input_ids, attention_mask)
    unknown = [n for n in names if n not in masks]
    if unknown:
        raise HeadscopeError(f"unknown key group(s) {unknown}; choose from {sorted(masks)}")
    groups = torch.full(masks["image"].shape, -1, dtype=torch.long, device=masks["image"].device)
    for i, name in enumerate(names):
        groups[masks[name] & (groups < 0)] = i
    return groups


def without_image(hm, batch: dict) -> dict:
    """The same prompts with the image tokens spliced out (and no pixel inputs), left-padded again:
    VHD's text-only forward (He et al. 2025)."""
    ids, mask = batch["input_ids"], batch.get("attention_mask")
    keep = ~image_mask(hm, ids)
    if mask is not None:
        keep &= mask.bool()
    rows = [ids[b][keep[b]] for b in range(ids.shape[0])]
    n = max(len(r) for r in rows)
    pad = pad_id(hm)
    out_ids = torch.full((len(rows), n), pad, dtype=ids.dtype, device=ids.device)
    out_mask = torch.zeros((len(rows), n), dtype=torch.long, device=ids.device)
    for b, r in enumerate(rows):
        out_ids[b, n - len(r):] = r
        out_mask[b, n - len(r):] = 1
    return {"input_ids": out_ids, "attention_mask": out_mask}


def with_positions(hm, batch: dict) -> dict:
    """Left-padded inputs with position ids counted from each row's first real token (what generate()
    does), so a padded row computes what it computes alone (:func:`headscope.hf.inputs.with_positions`)."""
    return inputs.with_positions(hm.model.config, batch)


def pad_id(hm) -> int:
    """The model's pad id (:func:`headscope.hf.inputs.pad_id`)."""
    return inputs.pad_id(hm.tokenizer)
