"""``--task sinks``: received-attention sink scores per head (Gu et al. 2024), plus massive
activations and secondary sinks printed as a summary.

    headscope score --task sinks --model M --text FILE --out sinks.csv [--eps 0.3] [--rank mass]
"""

from __future__ import annotations

from headscope.analyzers import sinks
from headscope.cli.registry import register_task
from headscope.data import read_plain
from headscope.errors import HeadscopeError
from headscope.tasks.needle import load_haystack
from headscope.validate import positive_int


def read_texts(path: str | None, default_sentences: int = 8, default_texts: int = 4) -> list[str]:
    """Non-empty lines of ``path``; default: chunks of the shipped haystack text."""
    if path is None:
        sentences = load_haystack()
        return [" ".join(sentences[i : i + default_sentences])
                for i in range(0, default_sentences * default_texts, default_sentences)]
    texts = [line.strip() for line in read_plain(path, "text file", "one text per line").splitlines() if line.strip()]
    if not texts:
        raise HeadscopeError(f"text file {path} is empty; give one text per line")
    return texts


@register_task("sinks", default_model="retrieval")
def add_arguments(parser, command: str) -> None:
    parser.add_argument("--text", help="text file, one text per line (default: shipped haystack text)")
    parser.add_argument("--eps", type=float, default=0.3, help="sink threshold on alpha (Gu et al.: 0.3)")
    parser.add_argument("--rank", choices=("first-token", "mass"), default="first-token",
                        help="export the first token's alpha per head, or the mass each head gives its sinks")
    parser.add_argument("--max-tokens", type=positive_int, default=None, help="cut each text to this many tokens")
    parser.add_argument("--massive-threshold", type=float, default=100.0)
    parser.add_argument("--massive-ratio", type=float, default=1000.0)


def check(args) -> None:
    if args.text:
        read_texts(args.text)


def score(args, hm):
    texts = read_texts(args.text)
    report = sinks.attention_sinks(hm, texts, eps=args.eps, max_tokens=args.max_tokens)
    by_layer = report.sink_tokens_by_layer()
    print(f"first token is a sink in {report.first_token_share:.1%} of (head, text) pairs")
    if not by_layer.empty:
        print("sink tokens per layer ((text, head) pairs):")
        for layer, rows in by_layer.groupby("layer"):
            print(f"  layer {layer}: " + ", ".join(f"{t!r} x{n}" for t, n in zip(rows.token, rows.heads)))
    massive = sinks.massive_activations(hm, texts, args.massive_threshold, args.massive_ratio, args.max_tokens)
    print(f"massive activations: {len(massive)} entries, dims {sinks.massive_dims(massive)}")
    secondary = sinks.secondary_sinks(hm, texts, max_tokens=args.max_tokens)
    if not secondary.empty:
        print("sink-like tokens (|cos| with the first token > 0.9): "
              + ", ".join(f"{c}: {n}" for c, n in secondary["class"].value_counts().items()))
    return report.first_token if args.rank == "first-token" else report.mass_on_sinks
