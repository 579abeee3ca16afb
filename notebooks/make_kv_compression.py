"""Writes notebooks/04_kv_compression.ipynb; CI executes it (tests/test_notebooks.py).

    python notebooks/make_kv_compression.py --execute    # with outputs (how it is committed)
"""

from build import write

cells = [
    ("md", "# From head scores to a smaller KV cache\n\nDuoAttention (Xiao et al. 2025) keeps the full "
           "KV cache only for retrieval heads; every other KV head keeps `sink` first tokens plus a `recent` "
           "window in a fixed-size ring buffer. Here: the retrieval organism (4 layers x 2 KV heads), its "
           "needle accuracy against the KV bytes actually held, for three ways of choosing the full heads: "
           "headscope's retrieval ranking, RazorAttention's data-free rule (echo / induction heads on repeated "
           "random tokens) and random heads."),
    ("code", "import random, torch, pandas as pd\n"
             "from headscope import HeadModel, NeedleTask, retrieval_heads, needle_accuracy, zoo\n"
             "from headscope.interventions.kinds import kv_compress as kvc\n"
             "from headscope.plots import Figure\n"
             "import plotly.graph_objects as go\n\n"
             "torch.manual_seed(0)\n"
             "hm = HeadModel.load(\"retrieval\")\n"
             "g = hm.geometry\n"
             "grid = zoo.organism_info(\"retrieval\")[\"needle\"]\n"
             "trials = NeedleTask(hm.tokenizer, lengths=[max(grid[\"lengths\"])], depths=[50.0],\n"
             "                    use_chat_template=False).trials()\n"
             "print(len(trials), \"trials of\", len(trials[0].prompt_ids), \"tokens;\", g.n_layers, \"layers x\", g.n_kv_heads, \"KV heads\")"),
    ("md", "## Three choices of full heads\nThe retrieval ranking scores query heads; a KV group is full as "
           "soon as one of its query heads comes up in the ranking (`rule=\"any\"`)."),
    ("code", "ranking = retrieval_heads(hm, NeedleTask(hm.tokenizer, lengths=grid[\"lengths\"], depths=grid[\"depths\"],\n"
             "                                         use_chat_template=False).trials(), progress=False).scores\n"
             "razor = kvc.razor_scores(hm).scores\n"
             "full_cache = needle_accuracy(hm, trials, progress=False)[\"correct\"].mean()\n"
             "print(f\"full cache accuracy {full_cache:.3f}\")\n"
             "kvc.full_heads_from_scores(ranking, g.n_kv_heads, 0.25).int()"),
    ("code", "def run(full, sink=4, recent=64):\n"
             "    with kvc.compress(hm, full, sink=sink, recent=recent) as state:\n"
             "        acc = needle_accuracy(hm, trials, progress=False)[\"correct\"].mean()\n"
             "    return acc, state.longest[\"kv_bytes_held\"], state.longest[\"kv_bytes_full\"]\n\n"
             "rng = random.Random(0)\n"
             "rows = []\n"
             "for share in (0.0, 0.125, 0.25, 0.5, 1.0):\n"
             "    chosen = {\"retrieval\": kvc.full_heads_from_scores(ranking, g.n_kv_heads, share),\n"
             "              \"razor\": kvc.full_heads_from_scores(razor, g.n_kv_heads, share)}\n"
             "    for name, full in chosen.items():\n"
             "        acc, held, total = run(full)\n"
             "        rows.append({\"selection\": name, \"share\": share, \"accuracy\": acc, \"kv_kib\": held / 1024})\n"
             "    draws = [run(kvc.random_full_heads(chosen[\"retrieval\"], rng, per_layer=False)) for _ in range(2)]\n"
             "    rows.append({\"selection\": \"random (2 draws, mean)\", \"share\": share,\n"
             "                 \"accuracy\": sum(d[0] for d in draws) / 2, \"kv_kib\": draws[0][1] / 1024})\n"
             "table = pd.DataFrame(rows)\n"
             "print(f\"full cache: {total / 1024:.1f} KiB per sequence\")\n"
             "table.pivot(index=\"selection\", columns=\"share\", values=\"accuracy\")"),
    ("md", "## Accuracy against KV memory\nColumns: the KV bytes held per sequence at the end of the longest "
           "trial (every tensor of the cache), for each share of full KV heads."),
    ("code", "pivot = table.pivot(index=\"selection\", columns=\"share\", values=\"accuracy\")\n"
             "memory = table.groupby(\"share\")[\"kv_kib\"].first()\n"
             "fig = Figure(go.Heatmap(z=pivot.values, x=[f\"{s:g}: {memory[s]:.0f} KiB\" for s in pivot.columns],\n"
             "                        y=list(pivot.index), zmin=0, zmax=1, colorscale=\"RdYlGn\"))\n"
             "fig.update_layout(title=\"needle accuracy by full-head share (KV held)\")\n"
             "fig"),
    ("md", "## What the cache holds, per head\nAt a quarter of the KV heads full: full heads hold every "
           "token; streaming heads `sink + recent` slots, whatever the context length."),
    ("code", "full = kvc.full_heads_from_scores(ranking, g.n_kv_heads, 0.25)\n"
             "ids = torch.tensor([trials[0].prompt_ids])\n"
             "with torch.no_grad(), kvc.compress(hm, full, sink=4, recent=64) as state:\n"
             "    hm.model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=hm.tokenizer.pad_token_id)\n"
             "held = torch.tensor([[h[k][\"tokens\"] for k in sorted(h)] for h in state.cache.held()])\n"
             "for i in (0, 1):  # layer 0: both KV heads streaming; layer 1: both full\n"
             "    layer = state.cache.layers[i]\n"
             "    print(f\"layer {i} tensors:\", {n: tuple(t.shape) for n, t in [(\"full keys\", layer.keys),\n"
             "          (\"ring keys\", layer.ring_keys), (\"sink keys\", layer.sink_keys)] if t is not None})\n"
             "fig = Figure(go.Heatmap(z=held.tolist(), x=[f\"KV {k}\" for k in range(g.n_kv_heads)],\n"
             "                        y=[f\"L{l}\" for l in range(g.n_layers)], colorscale=\"Blues\"))\n"
             "fig.update_layout(title=\"tokens held per KV head (duo, 25 % full)\")\n"
             "fig"),
    ("md", "## HeadKV: per-head budgets\nThe same mean budget (sink + recent = 68 tokens per KV head), shared "
           "in proportion to the KV heads' retrieval scores with a floor of 8; each head keeps the prompt "
           "tokens its last 8 queries attend to most (SnapKV)."),
    ("code", "budgets = kvc.headkv_budgets(kvc.kv_group_scores(ranking, g.n_kv_heads, \"mean\"), budget=68, floor=8)\n"
             "with kvc.compress(hm, policy=\"headkv\", budgets=budgets) as state:\n"
             "    acc = needle_accuracy(hm, trials, progress=False)[\"correct\"].mean()\n"
             "print(f\"headkv accuracy {acc:.3f}, KV held {state.longest['kv_bytes_held'] / 1024:.1f} KiB\")\n"
             "fig = Figure(go.Heatmap(z=budgets.tolist(), x=[f\"KV {k}\" for k in range(g.n_kv_heads)],\n"
             "                        y=[f\"L{l}\" for l in range(g.n_layers)], colorscale=\"Blues\"))\n"
             "fig.update_layout(title=\"HeadKV prompt budget per KV head (tokens)\")\n"
             "fig"),
    ("md", "## Files serving tools read\n`headscope export ranking.csv --format duo|retrieval-head|qrhead` "
           "writes the same choice for DuoAttention / kvpress, HeadKV / DeCoRe and QRHead, with provenance."),
    ("code", "from headscope import HeadScores, formats\n"
             "prov = formats.provenance(hm, task=\"needle\", seed=0)\n"
             "formats.export(HeadScores(ranking, \"retrieval\", hm.name), \"duo\", \"patterns\", prov=prov,\n"
             "               n_kv_heads=g.n_kv_heads, full_share=0.25)\n"
             "print(open(\"patterns/full_attention_heads.tsv\").read())\n"
             "formats.read_scores(\"patterns\", (g.n_layers, g.n_heads), g.n_kv_heads, kv_level=True).scores"),
]

write(cells, "04_kv_compression.ipynb")
