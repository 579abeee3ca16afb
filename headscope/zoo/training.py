"""Reusable pieces for training the model organisms: a word-level tokenizer and a seeded loop.

Organisms are tiny Hugging Face models trained from scratch on synthetic text, so their
tokenizer is built here from the training texts themselves (every word is one token, digits are
single tokens) and saved next to the weights with ``save_pretrained``.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import GenerationConfig, LlamaConfig, PreTrainedTokenizerFast

from headscope.io import write_whole
from headscope.model import HeadModel

SPECIAL_TOKENS = ("<bos>", "<eos>", "<pad>", "<unk>")


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Newlines kept as tokens, other whitespace dropped, punctuation and digits split off."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
            pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),
            pre_tokenizers.Punctuation(behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )


def build_word_tokenizer(
    texts: Iterable[str], extra_tokens: Sequence[str] = (), join_digits: bool = False
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose vocabulary is every word of ``texts`` (plus ``extra_tokens``).

    Ids 0-3 are ``<bos> <eos> <pad> <unk>``; then the digits 0-9; then the words in order of first
    appearance (deterministic). ``add_special_tokens=True`` prepends ``<bos>``; decoding joins the
    words with spaces (and drops the space before punctuation). ``join_digits``: decoding also drops
    the space between digits, so numbers read as written ("is 8165.", not "is 8 1 6 5.").
    """
    pre = _pre_tokenizer()
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    words = [str(d) for d in range(10)] + list(extra_tokens)
    for text in texts:
        words.extend(piece for piece, _ in pre.pre_tokenize_str(text))
    for word in words:
        if word and word not in vocab:
            vocab[word] = len(vocab)

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    if join_digits:
        tok.decoder = decoders.Sequence([tok.decoder, decoders.Fuse(), decoders.Replace(Regex(r"(?<=\d) (?=\d)"), "")])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=1 << 20,
    )


def seed_everything(seed: int, threads: int = 1) -> None:
    """Seed Python, NumPy and torch; use deterministic torch kernels on ``threads`` CPU threads."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)


def lr_at(step: int, steps: int, lr: float, warmup: int, schedule: str = "cosine", min_ratio: float = 0.1) -> float:
    """Linear warmup, then cosine or linear decay to ``min_ratio * lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    decay = 0.5 * (1 + math.cos(math.pi * frac)) if schedule == "cosine" else 1 - frac
    return lr * (min_ratio + (1 - min_ratio) * decay)


def weighted_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, weighted per target token (weight 0 masks a token out).

    ``weights[b, t]`` weighs the prediction of ``input_ids[b, t]`` (from position t-1).
    """
    logits = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    w = weights[:, 1:].to(logits.dtype)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
    return (ce * w.reshape(-1)).sum() / w.sum().clamp_min(1e-8)


def head_output_norms(model) -> torch.Tensor:
    """``[layers, heads]`` Frobenius norms of each head's slice of ``o_proj`` (Llama-style models).

    Their sum is a group-lasso penalty: it drives heads the task does not need to zero, so the
    organism's mechanism lives in few heads (one head per function, not many redundant copies).
    """
    cfg = model.config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    norms = []
    for layer in model.model.layers:
        w = layer.self_attn.o_proj.weight  # [hidden, heads * head_dim]
        norms.append(w.view(w.shape[0], cfg.num_attention_heads, hd).norm(dim=(0, 2)))
    return torch.stack(norms)


@contextlib.contextmanager
def head_dropout(model, layers: Iterable[int], p: float) -> Iterator[None]:
    """Drop whole heads of ``layers`` at random while training (per sequence, probability ``p``).

    Zeroes a head's output z (the input of ``o_proj``) with inverted-dropout scaling; inactive in
    eval mode. The model learns to spread those layers' work over several heads, so no single one
    of them is critical. A z-edit of HeadModel's hook table, removed on exit.
    """
    layers = set(layers)
    if p <= 0 or not layers:
        yield
        return
    hm = HeadModel(model)

    def drop(layer: int, z: torch.Tensor, positions: range) -> torch.Tensor:
        if layer not in layers or not hm.model.training:
            return z
        keep = (torch.rand(z.shape[0], 1, z.shape[2], 1, device=z.device) >= p).to(z.dtype) / (1 - p)
        return z * keep

    with hm.edit_z(drop):
        yield


def train_loop(
    model: torch.nn.Module,
    make_batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    lr: float = 3e-3,
    warmup: int = 50,
    weight_decay: float = 0.01,
    clip: float = 1.0,
    schedule: str = "cosine",
    log_every: int = 50,
    log: Callable[[str], None] = print,
    regularizer: Callable[[torch.nn.Module], torch.Tensor] | None = None,
) -> dict:
    """Train ``model`` with AdamW on batches ``make_batch(step) -> (inputs, loss_weights)``.

    ``inputs`` is the input_ids tensor, or a dict of model inputs holding ``input_ids`` (e.g. with
    ``pixel_values`` for an image-text model).

    ``regularizer(model)`` (optional) is added to the loss; the logged loss excludes it.

    Returns ``{"final_loss", "wall_s", "losses"}``; ``final_loss`` is the mean of the last 20 steps.
    """
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embed" in n]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
    )
    model.train()
    losses: list[float] = []
    start = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup, schedule)
        inputs, weights = make_batch(step)
        inputs = {"input_ids": inputs} if isinstance(inputs, torch.Tensor) else inputs
        logits = model(**inputs).logits
        loss = weighted_lm_loss(logits, inputs["input_ids"], weights)
        total = loss + regularizer(model) if regularizer is not None else loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            recent = float(np.mean(losses[-log_every:]))
            log(f"step {step:5d}  loss {recent:.4f}  lr {opt.param_groups[0]['lr']:.2e}  {time.time() - start:6.0f}s")
    model.eval()
    return {"final_loss": float(np.mean(losses[-20:])), "wall_s": time.time() - start, "losses": losses}


def organism_config(tokenizer, *, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
                    max_positions: int, attention_bias: bool = False):
    """The organisms' architecture: a tiny LlamaConfig with GQA (kv_heads < heads) and tied embeddings
    (``attention_bias``: biases on the q/k/v/o projections, as some Llama-family models have)."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=max_positions,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attention_bias=attention_bias,
        attn_implementation="sdpa",
    )


def save_organism(model, tokenizer, out, meta: dict, max_new_tokens: int) -> None:
    """Weights, tokenizer (with special_tokens_map.json, which transformers 5 no longer writes),
    a greedy generation config and ``organism.json`` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=max_new_tokens,
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    special = {k: getattr(tokenizer, k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    write_whole(out / "special_tokens_map.json", json.dumps(special, indent=2) + "\n")
    write_whole(out / "organism.json", json.dumps(meta, indent=2) + "\n")

