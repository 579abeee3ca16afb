"""Random-init image-text models of real families, saved to local folders with a processor.

For tests, benchmarks and examples that need a LLaVA-shaped model without downloading one::

    path = random_llava("/tmp/tiny-llava")                 # LlavaForConditionalGeneration + processor
    hm = HeadModel.load(path)

The tokenizer is a whitespace word-level one over a small vocabulary plus ``<image>``; the image
processor is CLIP's PIL backend (no torchvision).
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as tf
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

WORDS = ("<unk> <s> </s> <pad> USER: ASSISTANT: a an the is there in image picture of and with no yes ? . , "
         "red green blue yellow purple orange square circle triangle star cross heart describe what do you see "
         "left right top bottom").split()


def word_tokenizer(extra: tuple[str, ...] = ()):
    """A word-level fast tokenizer over WORDS (+ ``extra``) with ``<image>`` as a special token."""
    words = list(dict.fromkeys([*WORDS, *extra]))
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>", padding_side="left")
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tok


def random_llava(path: str | Path, *, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                 image_size: int = 32, patch_size: int = 8, vision_hidden: int = 32, vision_layers: int = 1,
                 max_positions: int = 512, seed: int = 0) -> Path:
    """Save a random-init LlavaForConditionalGeneration (tiny CLIP tower + tiny Llama, GQA) and its
    processor to ``path``; (image_size / patch_size)^2 image tokens per image."""
    path = Path(path)
    tok = word_tokenizer()
    image_token = tok.convert_tokens_to_ids("<image>")
    processor = tf.LlavaProcessor(
        image_processor=tf.CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                                 crop_size={"height": image_size, "width": image_size}),
        tokenizer=tok, patch_size=patch_size, vision_feature_select_strategy="default", image_token="<image>",
        num_additional_image_tokens=1)
    vision_config = tf.CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                                        num_hidden_layers=vision_layers, num_attention_heads=2,
                                        image_size=image_size, patch_size=patch_size)
    text_config = tf.LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                 num_key_value_heads=kv_heads, intermediate_size=2 * hidden, vocab_size=len(tok),
                                 max_position_embeddings=max_positions, bos_token_id=tok.bos_token_id,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = tf.LlavaConfig(vision_config=vision_config, text_config=text_config, image_token_index=image_token,
                            vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = tf.LlavaForConditionalGeneration(config)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
