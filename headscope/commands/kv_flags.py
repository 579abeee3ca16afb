"""``--kv-compress``: generate / eval with a head-wise compressed KV cache (an edit flag).

    --kv-compress RANKING|razor   full KV heads from a ranking (a headscope CSV, or a DuoAttention /
                                  Retrieval_Head / QRHead file), or RazorAttention's data-free choice
      --full-share S [0.25]       share of KV heads kept full (duo)
      --sink N [4] --recent N [64]
      --policy duo|headkv         DuoAttention streaming heads, or HeadKV budgets (mean budget
                                  sink + recent tokens per KV head, floor 8 = SnapKV's window)
      --kv-rule any|mean|max      query heads -> KV group [any]
      --random-heads              random full heads, the same count per layer (eval: --draws N --seed S);
                                  with headkv: the KV-head scores shuffled before the budgets are set

eval prints ``kv_bytes_held: N`` and ``kv_bytes_full: M`` (per sequence, every tensor of the cache, at
the end of the longest call) before the metric.
"""

from __future__ import annotations

import random

from headscope import zoo
from headscope.methods import kv_compression as kvc

RAZOR = "razor"
HEADKV_FLOOR = 8


def add_arguments(parser) -> None:
    parser.add_argument("--kv-compress", metavar="RANKING", default=None,
                        help="compress the KV cache head-wise: full KV heads from this ranking (headscope CSV, "
                             "DuoAttention folder/TSV, Retrieval_Head JSON, QRHead YAML) or 'razor' (data-free)")
    parser.add_argument("--full-share", type=float, default=0.25, help="with --kv-compress: share of KV heads kept full")
    parser.add_argument("--sink", type=int, default=4, help="with --kv-compress: sink tokens of streaming heads [4]")
    parser.add_argument("--recent", type=int, default=64, help="with --kv-compress: recent window of streaming heads [64]")
    parser.add_argument("--policy", choices=kvc.POLICIES, default="duo",
                        help="with --kv-compress: duo (full / streaming heads) or headkv (per-head budgets)")
    parser.add_argument("--kv-rule", choices=kvc.RULES, default="any",
                        help="with --kv-compress: a KV group is full if any of its query heads is chosen, or by "
                             "the mean / max of their scores")


def _longest_context(args) -> int | None:
    lengths = getattr(args, "lengths", None)
    if lengths:
        return max(lengths)
    if getattr(args, "task", None) == "needle":
        model = args.model or "retrieval"  # the needle task's default model (set after the checks)
        grid = zoo.organism_info(model).get("needle", {}) if model in zoo.ORGANISMS else {}
        return max(grid["lengths"]) if grid.get("lengths") else None
    return None


def check(args) -> None:
    """Shares, window and the ranking file checked before any model loads."""
    if getattr(args, "kv_compress", None) is None:
        return
    kvc.check_share(args.full_share)
    kvc.check_window(args.sink, args.recent, _longest_context(args))
    if args.kv_compress != RAZOR:
        from headscope.heads import check_ranking

        check_ranking(args.kv_compress, None)


def _scores(args, hm):
    from headscope.scores import HeadScores

    g = hm.geometry
    if args.kv_compress == RAZOR:
        return kvc.razor_scores(hm, seed=getattr(args, "seed", 0)).scores
    from headscope import formats

    if formats.published_format(args.kv_compress):
        return formats.read_scores(args.kv_compress, (g.n_layers, g.n_heads), g.n_kv_heads, kv_level=True).scores
    return HeadScores.from_csv(args.kv_compress, grid=(g.n_layers, g.n_heads)).scores


def build(args, hm, rng: random.Random | None = None) -> list:
    if getattr(args, "kv_compress", None) is None:
        return []
    g = hm.geometry
    scores = _scores(args, hm)
    if args.policy == "headkv":
        kv = scores if scores.shape[1] == g.n_kv_heads else kvc.kv_group_scores(
            scores, g.n_kv_heads, "max" if args.kv_rule == "max" else "mean")
        if getattr(args, "random_heads", False):
            flat = kv.flatten()
            kv = flat[_shuffled(flat.numel(), rng or random.Random(args.seed))].view_as(kv)
        budget = args.sink + args.recent
        return [kvc.kv_edit(budgets=kvc.headkv_budgets(kv, budget, min(HEADKV_FLOOR, budget)))]
    full = kvc.full_heads_from_scores(scores, g.n_kv_heads, args.full_share, args.kv_rule)
    if getattr(args, "random_heads", False):
        full = kvc.random_full_heads(full, rng or random.Random(args.seed))
    return [kvc.kv_edit(full, sink=args.sink, recent=args.recent)]


def _shuffled(n: int, rng: random.Random):
    order = list(range(n))
    rng.shuffle(order)
    return order


def report(args) -> list[str]:
    """The kv_bytes lines of the latest compression (none without --kv-compress)."""
    state = kvc.latest() if getattr(args, "kv_compress", None) is not None else None
    if state is None or state.longest is None:
        return []
    return [f"kv_bytes_held: {state.longest['kv_bytes_held']}", f"kv_bytes_full: {state.longest['kv_bytes_full']}"]
