"""Writes notebooks/02_vision.ipynb; CI executes it (tests/test_notebooks.py).

    python notebooks/make_vision.py --execute    # with outputs (how it is committed)
"""

from build import write

cells = [
    ("md", "# headscope on a vision-language model: VHD, VHR and VAR\n\n"
           "The shipped *vision organism* is a real `LlavaForConditionalGeneration` (tiny CLIP tower + tiny "
           "Llama) that captions coloured shapes and answers POPE-style yes/no questions. Its training data "
           "carries a co-occurrence prior (some shapes nearly always come with a partner), so it names the "
           "partner when it is absent. We find its vision-aware heads with VHD (He et al. 2025), reinforce "
           "them (VHR), redistribute attention off sink tokens (VAR, Kang et al. 2025), and measure "
           "hallucination with CHAIR and POPE."),
    ("code", "import random, pandas as pd, torch\n"
             "from headscope import HeadModel, HeadScores, vision, zoo\n"
             "from headscope.analyzers.vision import vision_aware_heads, select_heads\n"
             "from headscope.heads import same_layer_random_heads\n"
             "from headscope.interventions import Edit, intervene\n"
             "from headscope.interventions.kinds.var import var_edit\n"
             "from headscope.interventions.kinds.var import calibration_inputs\n"
             "from headscope.tasks import shapes\n\n"
             "hm = HeadModel.load(\"vision\")\n"
             "folder = zoo.organism_path(\"vision\")\n"
             "hm"),
    ("md", "## VHD: which heads look at the image\nTwo forwards per probe scene (with the image tokens, and "
           "with them spliced out); each head's output at the last token; L2 distance, per-layer outlier "
           "filter, mean over the 16 probe scenes."),
    ("code", "probe = [(folder / \"images\" / r[\"image\"], r[\"prompt\"]) for r in\n"
             "         pd.read_json(folder / \"prompts.jsonl\", lines=True).to_dict(\"records\")]\n"
             "scores = vision_aware_heads(hm, [vision.load_image(p) for p, _ in probe], [q for _, q in probe])\n"
             "vhr_heads = select_heads(scores)\n"
             "print(\"VHR heads (above their layer median, layers\", scores.params[\"layers\"], \"):\", vhr_heads)\n"
             "scores.heatmap()"),
    ("md", "## One held-out scene, captioned greedily\nThe scene holds an anchor shape without its usual partner."),
    ("code", "scene = shapes.heldout_scenes(1, seed=1)[0]\n"
             "print(\"truly in the image:\", sorted(scene.kinds))\n"
             "display(scene.image().resize((128, 128), 0))\n"
             "batch = vision.encode(hm, [scene.image()], [shapes.CAPTION_PROMPT])\n"
             "edits = {\"greedy\": [], \"VHR\": [Edit(\"scale\", vhr_heads, strength=2.0)],\n"
             "         \"VAR\": [var_edit(hm, calibration_inputs(hm))]}\n"
             "n = batch[\"input_ids\"].shape[1]\n"
             "for name, edit in edits.items():\n"
             "    with torch.no_grad(), intervene(hm, edit):\n"
             "        out = hm.model.generate(**batch, max_new_tokens=24, do_sample=False, pad_token_id=vision.pad_id(hm))\n"
             "    print(f\"{name:>6}: {hm.tokenizer.decode(out[0, n:], skip_special_tokens=True)}\")"),
    ("md", "## Hallucination table\nCHAIR (lower is better) and POPE on a few held-out partner-absent scenes "
           "(8 scenes here, so the table is noisy; the README gives 200 scenes from `headscope eval --task hallucination --scenes 200`). Random heads: "
           "as many per layer as VHR selects."),
    ("code", "scenes = shapes.heldout_scenes(8, seed=1)\n"
             "edits[\"VHR, random heads\"] = [Edit(\"scale\", same_layer_random_heads(vhr_heads, hm.geometry.n_heads, random.Random(0), exclude_given=False), strength=2.0)]\n"
             "rows = {}\n"
             "for name, edit in edits.items():\n"
             "    with intervene(hm, edit):\n"
             "        m = shapes.scene_metrics(hm, scenes, settings=(\"adversarial\",))\n"
             "    rows[name] = {k: m[k] for k in (\"chair_i\", \"chair_s\", \"pope_acc\", \"pope_f1\")}\n"
             "pd.DataFrame(rows).T.round(3)"),
    ("md", "## VHD against the organism's ground truth\nThe organism ships the measured effect of scaling each "
           "head alone by 2 (as VHR does) on CHAIR_i and on POPE-adversarial F1."),
    ("code", "truth = pd.read_csv(zoo.ground_truth_path(\"vision\"))\n"
             "merged = scores.to_frame().merge(truth, on=[\"layer\", \"head\"])\n"
             "print(\"Spearman VHD vs CHAIR_i reduction (x2):\", round(merged[\"score\"].corr(-merged[\"change_chair_i_x2\"], method=\"spearman\"), 3))\n"
             "print(\"Spearman VHD vs POPE-adversarial F1 gain (x2):\", round(merged[\"score\"].corr(merged[\"change_pope_adversarial_f1_x2\"], method=\"spearman\"), 3))"),
]

write(cells, "02_vision.ipynb")
