"""The architecture coverage matrix: one tiny random-init model per family, checked against eager attention.

Each row of ``FAMILIES`` names a transformers ``model_type``, the config overrides that make it tiny,
and example hub ids. ``run_family`` builds the model and runs the checks of ``CHECKS``; the tests
(tests/test_coverage.py) assert them and ``python tests/coverage_matrix.py --readme README.md`` writes the README
table from the same results, so the table is generated, never written by hand.

Checks:
  stats     top-1 key, entropy, group mass and attention received per (layer, head), from the
            streamed kernel, equal eager attention's ``output_attentions`` pattern (sequence at
            least twice any sliding window);
  identity  ablating no head leaves the logits equal to the plain model's;
  ablate    zero-ablating layer 0's heads changes the logits;
  generate  greedy ``generate()`` under that ablation equals a manual argmax loop under it.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from headscope.errors import HeadscopeError
from headscope.io import write_whole
from headscope.model import HeadModel
from headscope.organisms import organism_path

CHECKS = ("stats", "identity", "ablate", "generate")
SEQ = 12  # >= 2 x WINDOW
WINDOW = 5
VOCAB = 96

DECODER = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64, head_dim=8,
               pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.3)


@dataclass(frozen=True)
class Family:
    """One architecture family of the matrix: a transformers model_type made tiny."""

    name: str
    model_type: str
    hub_ids: tuple[str, ...]
    config: dict = field(default_factory=dict)  # overrides on top of DECODER (unless bare)
    bare: bool = False  # True: use only ``config`` (the family names its own sizes)
    checks: tuple[str, ...] = CHECKS  # the checks this family supports
    note: str = ""  # what is special about it, shown in the README
    unsupported: str = ""  # non-empty: headscope refuses this family; a word its HeadscopeError must contain

    def build_config(self, **overrides):
        kwargs = dict(self.config) if self.bare else {**DECODER, **self.config}
        return AutoConfig.for_model(self.model_type, **{**kwargs, **overrides})


_ENC = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=64)
_SEQ2SEQ = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64, init_std=0.2,
                pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None)
_NO_GENERATE = tuple(c for c in CHECKS if c != "generate")
_SLIDING = dict(sliding_window=WINDOW)

FAMILIES: tuple[Family, ...] = (
    Family("Llama", "llama", ("meta-llama/Llama-3.2-1B", "TinyLlama/TinyLlama-1.1B-Chat-v1.0")),
    Family("Mistral", "mistral", ("mistralai/Mistral-7B-v0.1",), _SLIDING, note="sliding window"),
    Family("Mixtral", "mixtral", ("mistralai/Mixtral-8x7B-v0.1",), dict(num_local_experts=4, num_experts_per_tok=2)),
    Family("Qwen2", "qwen2", ("Qwen/Qwen2.5-0.5B",)),
    Family("Qwen2-MoE", "qwen2_moe", ("Qwen/Qwen1.5-MoE-A2.7B",),
           dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16)),
    Family("Qwen3", "qwen3", ("Qwen/Qwen3-0.6B",)),
    Family("Qwen3-MoE", "qwen3_moe", ("Qwen/Qwen3-30B-A3B",),
           dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)),
    Family("Gemma", "gemma", ("google/gemma-2b",)),
    Family("Gemma 2", "gemma2", ("google/gemma-2-2b", "google/gemma-2-9b"),
           dict(sliding_window=WINDOW, attn_logit_softcapping=1.0, final_logit_softcapping=30.0, query_pre_attn_scalar=8),
           note="logit softcap, alternating sliding-window layers"),
    Family("Gemma 3 (text)", "gemma3_text", ("google/gemma-3-1b-pt",),
           dict(sliding_window=WINDOW, num_hidden_layers=3, layer_types=["sliding_attention", "full_attention",
                                                                         "sliding_attention"]),
           note="sliding-window layers"),
    Family("Phi-3", "phi3", ("microsoft/Phi-3-mini-4k-instruct",)),
    Family("Phi", "phi", ("microsoft/phi-2",), dict(num_key_value_heads=4)),
    Family("OLMo", "olmo", ("allenai/OLMo-1B-hf",)),
    Family("OLMo 2", "olmo2", ("allenai/OLMo-2-0425-1B",)),
    Family("OLMoE", "olmoe", ("allenai/OLMoE-1B-7B-0924",), dict(num_experts=4, num_experts_per_tok=2)),
    Family("StableLM", "stablelm", ("stabilityai/stablelm-2-1_6b",)),
    Family("Cohere", "cohere", ("CohereForAI/c4ai-command-r-v01",)),
    Family("Granite", "granite", ("ibm-granite/granite-3.0-2b-base",)),
    Family("Starcoder2", "starcoder2", ("bigcode/starcoder2-3b",), _SLIDING),
    Family("GLM-4", "glm4", ("THUDM/glm-4-9b-hf",)),
    Family("DeepSeek-V2", "deepseek_v2", ("deepseek-ai/DeepSeek-V2-Lite",),
           dict(kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=6,
                n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1,
                n_group=1, topk_group=1, num_key_value_heads=4),
           note="MLA: value head dim != query/key head dim"),
    Family("DeepSeek-V3", "deepseek_v3", ("deepseek-ai/DeepSeek-V3", "deepseek-ai/DeepSeek-R1"),
           dict(kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=6,
                n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1,
                n_group=1, topk_group=1, num_key_value_heads=4, head_dim=4),
           note="MLA: value head dim != query/key head dim"),
    Family("GPT-2", "gpt2", ("gpt2", "openai-community/gpt2-medium"),
           dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64), bare=True),
    Family("GPT-NeoX (Pythia)", "gpt_neox", ("EleutherAI/pythia-70m", "EleutherAI/pythia-1.4b"),
           dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                max_position_embeddings=64, rotary_pct=0.25), bare=True),
    Family("GPT-J", "gptj", ("EleutherAI/gpt-j-6b",),
           dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4), bare=True),
    Family("OPT", "opt", ("facebook/opt-125m", "facebook/opt-1.3b"),
           dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=48,
                max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=1), bare=True),
    Family("Falcon", "falcon", ("tiiuae/falcon-7b", "tiiuae/falcon-40b"),
           dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64, new_decoder_architecture=True, num_kv_heads=2), bare=True,
           note="attention by a direct SDPA call; the ALiBi variant (falcon-rw) is unchecked: transformers' eager "
           "reference adds its ALiBi bias twice"),
    Family("GPT-BigCode", "gpt_bigcode", ("bigcode/starcoderbase-1b",),
           dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, multi_query=True), bare=True),
    Family("CodeGen", "codegen", ("Salesforce/codegen-350M-mono",),
           dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4), bare=True),
    Family("Jamba (attention layers)", "jamba", ("ai21labs/Jamba-v0.1",),
           dict(num_experts=2, num_experts_per_tok=1, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                expert_layer_offset=1, mamba_d_state=4, mamba_d_conv=2, mamba_expand=2, mamba_dt_rank=4,
                use_mamba_kernels=False, num_hidden_layers=4), note="hybrid: Mamba layers skipped"),
    Family("BLOOM", "bloom", ("bigscience/bloom-560m",),
           dict(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4), bare=True, unsupported="inline",
           note="ALiBi attention computed inline, outside the attention registry"),
    Family("MPT", "mpt", ("mosaicml/mpt-7b",),
           dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_seq_len=64), bare=True, unsupported="inline",
           note="attention computed inline, outside the attention registry"),
    Family("GPT-Neo", "gpt_neo", ("EleutherAI/gpt-neo-125m",),
           dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, max_position_embeddings=64,
                attention_types=[[["global", "local"], 1]], window_size=WINDOW), bare=True, unsupported="inline",
           note="attention computed inline, outside the attention registry"),
    Family("GPT-OSS", "gpt_oss", ("openai/gpt-oss-20b",),
           dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW, layer_types=None),
           unsupported="s_aux", note="attention-sink logits (s_aux) in the softmax"),
    Family("BERT", "bert", ("bert-base-uncased",), _ENC, bare=True, checks=_NO_GENERATE, note="encoder"),
    Family("RoBERTa", "roberta", ("roberta-base",), {**_ENC, "pad_token_id": 1}, bare=True, checks=_NO_GENERATE,
           note="encoder"),
    Family("T5", "t5", ("google-t5/t5-small", "google/flan-t5-base"),
           dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
                relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1),
           bare=True, note="encoder self, decoder self and cross-attention heads"),
    Family("BART", "bart", ("facebook/bart-base",), _SEQ2SEQ, bare=True,
           note="encoder self, decoder self and cross-attention heads"),
)


def family(name: str) -> Family:
    for f in FAMILIES:
        if f.name == name:
            return f
    raise HeadscopeError(f"unknown family {name!r}; choose from {[f.name for f in FAMILIES]}")


# ------------------------------------------------------------------------------------- building
def build_model(fam: Family, seed: int = 0, **overrides):
    """The family's tiny random-init model (eager attention, the reference), in eval mode."""
    config = fam.build_config(**overrides)
    torch.manual_seed(seed)
    auto = AutoModel if "generate" not in fam.checks else (
        AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM)
    model = auto.from_config(config, attn_implementation="eager", dtype=torch.float32)
    return model.eval()


def save_family(fam: Family, folder: str | os.PathLike, tokenizer_from: str = "multitask") -> Path:
    """Write the family's tiny random-init model with a shipped organism's tokenizer to ``folder``
    (a local model folder for ``headscope --model``)."""
    tokenizer = AutoTokenizer.from_pretrained(organism_path(tokenizer_from))
    model = build_model(fam, vocab_size=len(tokenizer), max_position_embeddings=256)
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def sample_inputs(model, seq: int = SEQ, seed: int = 0) -> dict:
    """Random token ids (batch 2) avoiding special tokens; seq2seq models get decoder ids too."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (2, seq), generator=g)
    inputs = {"input_ids": ids}
    if model.config.is_encoder_decoder:
        inputs["decoder_input_ids"] = torch.randint(4, VOCAB, (2, seq), generator=g)
    return inputs


def _logits(out) -> torch.Tensor:
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def eager_patterns(model, inputs) -> list[torch.Tensor]:
    """Eager attention probabilities [B, H, Nq, Nk] per attention layer, in HeadModel's layer order."""
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    if model.config.is_encoder_decoder:
        found = list(out.encoder_attentions) + list(out.decoder_attentions) + list(out.cross_attentions)
    else:
        found = list(out.attentions)
    return [a for a in found if a is not None]


# ------------------------------------------------------------------------------------- checks
def check_stats(hm, inputs, patterns: list[torch.Tensor]) -> None:
    """Kernel statistics of every (layer, head) equal the eager pattern's (raises AssertionError)."""
    n_keys = inputs["input_ids"].shape[1]
    groups = torch.arange(n_keys).remainder(3).unsqueeze(0).expand(2, -1).clone()
    groups[:, 0] = -1
    with torch.no_grad(), hm.attention_stats(["top1", "entropy", "group_mass", "received"],
                                             key_groups=groups, num_groups=3) as rec:
        hm.model(**inputs)
    assert len(patterns) == hm.geometry.n_layers, (len(patterns), hm.geometry.n_layers)
    onehot = (groups.unsqueeze(-1) == torch.arange(3)).float()  # [B, N, 3]
    for layer, p in enumerate(patterns):
        stats = rec.call()[layer]
        p = p.double()
        top = p.gather(-1, stats.top1_index.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(top, p.amax(-1), atol=1e-5, rtol=0, msg=f"top-1, layer {layer}")
        entropy = -(p * p.clamp_min(1e-300).log()).sum(-1)
        torch.testing.assert_close(stats.entropy.double(), entropy, atol=1e-4, rtol=0, msg=f"entropy, layer {layer}")
        mass = torch.einsum("bhqk,bkg->bhqg", p, onehot.double()[:, : p.shape[-1]])
        torch.testing.assert_close(stats.group_mass.double(), mass, atol=1e-5, rtol=0, msg=f"group mass, layer {layer}")
        torch.testing.assert_close(stats.received.double(), p.sum(2), atol=1e-4, rtol=0, msg=f"received, layer {layer}")


def check_identity(hm, inputs, plain: torch.Tensor) -> None:
    with torch.no_grad(), hm.ablate([]):
        edited = _logits(hm.model(**inputs))
    torch.testing.assert_close(edited, plain, atol=1e-4, rtol=1e-4, msg="ablating no head changed the output")


def layer0_heads(hm) -> list[tuple[int, int]]:
    return [(0, h) for h in range(hm.geometry.n_heads)]


def check_ablate(hm, inputs, plain: torch.Tensor) -> None:
    with torch.no_grad(), hm.ablate(layer0_heads(hm)):
        edited = _logits(hm.model(**inputs))
    assert (edited - plain).abs().max() > 1e-3, "ablating layer 0's heads did not change the output"


def check_generate(hm, inputs, new_tokens: int = 4) -> None:
    """generate() under a zero-ablation equals a manual greedy loop (full forward each step) under it."""
    model = hm.model
    ids = inputs["input_ids"][:1]
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad(), hm.ablate(layer0_heads(hm)):
        generated = model.generate(ids, **kwargs)
        if model.config.is_encoder_decoder:
            seq = torch.tensor([[model.config.decoder_start_token_id]])
            for _ in range(new_tokens):
                nxt = model(input_ids=ids, decoder_input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
                seq = torch.cat([seq, nxt], 1)
        else:
            seq = ids
            for _ in range(new_tokens):
                seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(generated, seq), f"generate() {generated.tolist()} != manual loop {seq.tolist()}"


def refusal(model, inputs) -> str:
    """The HeadscopeError a refused family raises when headscope hooks it (AssertionError if none)."""
    try:
        hm = HeadModel(model)
        with torch.no_grad(), hm.attention_stats(["top1"]):
            model(**inputs)
    except HeadscopeError as exc:
        return str(exc)
    raise AssertionError(f"{type(model).__name__} was expected to be refused with a HeadscopeError")


def run_family(fam: Family) -> dict[str, str]:
    """Run every check on the family's tiny model: {check: "ok" | "n/a" | "FAIL: why"}."""
    model = build_model(fam)
    inputs = sample_inputs(model)
    if fam.unsupported:
        return {"refused": refusal(model, inputs)}
    patterns = eager_patterns(model, inputs)
    with torch.no_grad():
        plain = _logits(model(**inputs))
    hm = HeadModel(model)
    results = {}
    for name in CHECKS:
        if name not in fam.checks:
            results[name] = "n/a"
            continue
        try:
            if name == "stats":
                check_stats(hm, inputs, patterns)
            elif name == "identity":
                check_identity(hm, inputs, plain)
            elif name == "ablate":
                check_ablate(hm, inputs, plain)
            else:
                check_generate(hm, inputs)
            results[name] = "ok"
        except Exception as exc:  # recorded, the test re-raises
            results[name] = f"FAIL: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        assert not hm.hooks_installed()
    return results


# ------------------------------------------------------------------------------------- README table
README_START = "<!-- coverage-table:start (generated by python tests/coverage_matrix.py --readme README.md) -->"
README_END = "<!-- coverage-table:end -->"
_MARK = {"ok": "✓", "n/a": "n/a"}


def expected(fam: Family) -> dict[str, str]:
    """What ``run_family`` must return for this family, from its row of the table."""
    if fam.unsupported:
        return {"refused": fam.unsupported}
    return {name: "ok" if name in fam.checks else "n/a" for name in CHECKS}


def agrees(fam: Family, results: dict[str, str]) -> bool:
    want = expected(fam)
    if fam.unsupported:
        return set(results) == {"refused"} and fam.unsupported in results["refused"]
    return results == want


def render_table() -> str:
    """The README coverage table (markdown) for the families' declared results, which the matrix checks."""
    head = "| Family | Example hub ids | " + " | ".join(CHECKS) + " | Notes |"
    lines = [head, "|" + "---|" * (len(CHECKS) + 3)]
    for fam in FAMILIES:
        ids = ", ".join(f"`{i}`" for i in fam.hub_ids)
        if fam.unsupported:
            cells = ["refused (clear error)"] + [""] * (len(CHECKS) - 1)
        else:
            cells = [_MARK[v] for v in expected(fam).values()]
        lines.append(f"| {fam.name} | {ids} | " + " | ".join(cells) + f" | {fam.note} |")
    return "\n".join(lines)


def readme_section(text: str) -> str | None:
    """The table currently between the README markers, or None when the markers are missing."""
    if README_START not in text or README_END not in text:
        return None
    return text.split(README_START, 1)[1].split(README_END, 1)[0].strip()


def write_readme(path: str | os.PathLike) -> None:
    """Replace the marked section of the README with the table (written whole: temp file + rename)."""
    path = Path(path)
    text = path.read_text()
    if readme_section(text) is None:
        raise HeadscopeError(f"{path} has no coverage-table markers; add the lines\n{README_START}\n{README_END}")
    before, rest = text.split(README_START, 1)
    after = rest.split(README_END, 1)[1]
    new = f"{before}{README_START}\n{render_table()}\n{README_END}{after}"
    write_whole(path, new)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tests/coverage_matrix.py",
                                     description="Run the architecture coverage matrix; optionally rewrite the README table.")
    parser.add_argument("--readme", help="README to rewrite (its marked section) when every family agrees")
    parser.add_argument("--family", action="append", help="only these families (repeatable)")
    args = parser.parse_args(argv)
    if args.readme and args.family:
        parser.error("--readme rewrites the whole table: run every family (drop --family)")
    families = [family(n) for n in args.family] if args.family else list(FAMILIES)
    bad = []
    for fam in families:
        results = run_family(fam)
        ok = agrees(fam, results)
        print(f"{'ok  ' if ok else 'FAIL'} {fam.name:28s} {results}", flush=True)
        if not ok:
            bad.append(fam.name)
    if bad:
        print(f"{len(bad)} families disagree with their table row: {bad}; README left unchanged", file=sys.stderr)
        return 1
    if args.readme:
        write_readme(args.readme)
        print(f"wrote the coverage table of {len(FAMILIES)} families to {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
