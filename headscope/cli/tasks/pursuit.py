"""``--task pursuit``: head pursuit for a concept (Basile et al. 2025).

    headscope score --task pursuit --concept words.txt [--text prompts.txt] [--k 50] [--edit-alpha -1]
"""

from __future__ import annotations

from headscope import zoo
from headscope.analyzers import pursuit
from headscope.cli.registry import register_task
from headscope.cli.tasks.sinks import read_texts
from headscope.data import read_plain
from headscope.errors import HeadscopeError
from headscope.heads import format_heads
from headscope.tasks.needle import load_haystack
from headscope.validate import positive_int


@register_task("pursuit", default_model="topics")
def add_arguments(parser, command: str) -> None:
    parser.add_argument("--concept", required=True, help="text file: the concept's words, one per line")
    parser.add_argument("--text", help="prompts, one per line (default: the organism's shipped prompts, else "
                        "sentences of the shipped haystack text)")
    parser.add_argument("--k", type=positive_int, default=50, help="SOMP atoms (capped at the dictionary size)")
    parser.add_argument("--normalize", action="store_true", help="L2-normalise the atoms (authors' code: off)")
    parser.add_argument("--edit-alpha", type=float, default=None,
                        help="also scale the top 1%% heads' z by this (-1 suppress, 5 enhance) vs 10 random draws")
    parser.add_argument("--edit-top", type=positive_int, default=None, help="edit this many top heads instead of 1%%")


def check(args) -> None:
    read_plain(args.concept, "concept file", "one word per line")
    if args.text:
        read_texts(args.text)


def score(args, hm):
    if hm.tokenizer is None:
        raise HeadscopeError(f"{args.model} has no tokenizer; head pursuit needs one for prompts and concept words")
    words = [w.strip() for w in read_plain(args.concept, "concept file", "one word per line").splitlines() if w.strip()]
    concept = pursuit.concept_token_ids(hm.tokenizer, words)

    shipped = zoo.organism_info(args.model).get("prompts")
    if args.text or shipped:
        texts = read_texts(args.text or zoo.organism_path(args.model) / shipped)
    else:
        texts = load_haystack()[:32]
    prompts = [hm.tokenizer(t)["input_ids"] for t in texts]
    scores = pursuit.head_pursuit(hm, prompts, concept, k=args.k, normalize=args.normalize, progress=not args.quiet)
    if args.edit_alpha is not None:
        effect = pursuit.edit_effect(hm, prompts, concept, scores, alpha=args.edit_alpha, top=args.edit_top)
        print(f"concept probability: base {effect['base']:.4f}, top heads {format_heads(effect['heads'])} x{args.edit_alpha:g}: "
              f"{effect['edited']:.4f}, random same-layer heads: {effect['random_mean']:.4f} "
              f"+- {effect['random_std']:.4f}")
        scores.params["edit"] = effect
    return scores
