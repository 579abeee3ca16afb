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
    ("code", "import pandas as pd, torch\n"
             "from headscope import HeadModel, HeadScores, vision, zoo\n"
             "from headscope.analyzers.vision import default_layers, vision_aware_heads, select_heads\n"
             "from headscope.controls import random_control\n"
             "from headscope.heads import same_layer_random_heads\n"
             "from headscope.interventions import Edit, intervene\n"
             "from headscope.interventions.kinds.var import calibration_inputs, var_edit\n"
             "from headscope.interventions.kinds.vhr import per_layer_count_heads\n"
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
             "vhr_heads = select_heads(scores)  # for the fixed-head variant only\n"
             "print(\"fixed-head variant's heads (above their layer median over the probe set, layers\", scores.params[\"layers\"], \"):\", vhr_heads)\n"
             "scores.heatmap()"),
    ("md", "## One held-out scene, captioned greedily\nThe scene holds an anchor shape without its usual partner. "
           "**VHR** is the paper's rule: each input's own VHD at prefill chooses its heads (`Edit(\"vhr\", [])`, "
           "`--vhr per-input`), reused at every decode step. **VHR, fixed heads (variant)** scales the heads "
           "chosen once from the probe set above (`--vhr vhd.csv`); it is not the paper's rule. **VAR** follows "
           "the paper's rule: it acts only where a visual sink exists; the organism has none (no massive "
           "activations), so it changes nothing and says so in a warning."),
    ("code", "scene = shapes.heldout_scenes(1, seed=1)[0]\n"
             "print(\"truly in the image:\", sorted(scene.kinds))\n"
             "display(scene.image().resize((128, 128), 0))\n"
             "batch = vision.encode(hm, [scene.image()], [shapes.CAPTION_PROMPT])\n"
             "edits = {\"greedy\": [], \"VHR\": [Edit(\"vhr\", [], strength=2.0)],\n"
             "         \"VHR, fixed heads (variant)\": [Edit(\"scale\", vhr_heads, strength=2.0)],\n"
             "         \"VAR\": [var_edit(hm, calibration_inputs(hm))]}\n"
             "n = batch[\"input_ids\"].shape[1]\n"
             "for name, edit in edits.items():\n"
             "    with torch.no_grad(), intervene(hm, edit):\n"
             "        out = hm.model.generate(**batch, max_new_tokens=24, do_sample=False, pad_token_id=vision.pad_id(hm))\n"
             "    print(f\"{name:>26}: {hm.tokenizer.decode(out[0, n:], skip_special_tokens=True)}\")"),
    ("md", "## Hallucination table\nCHAIR (lower is better) and POPE on a few held-out partner-absent scenes "
           "(8 scenes here, so the table is noisy; the README gives 200 scenes from `python benchmarks/run_all.py --only vision`). "
           "Random heads: as many per layer as per-input VHR selects (half the heads of each of its layers), "
           "20 draws, mean and 95 % bootstrap interval (`headscope.controls.random_control`); a method beats "
           "random only outside that interval."),
    ("code", "scenes = shapes.heldout_scenes(8, seed=1)\n"
             "KEYS = (\"chair_i\", \"chair_s\", \"pope_acc\", \"pope_f1\")\n"
             "def measure(edit):\n"
             "    with intervene(hm, edit):\n"
             "        m = shapes.scene_metrics(hm, scenes, settings=(\"adversarial\",))\n"
             "    return {k: m[k] for k in KEYS}\n"
             "rows = {name: measure(edit) for name, edit in edits.items()}\n"
             "template = per_layer_count_heads(default_layers(hm.geometry.n_layers), hm.geometry.n_heads)\n"
             "control = random_control(lambda rng: measure([Edit(\"scale\", same_layer_random_heads(\n"
             "    template, hm.geometry.n_heads, rng, exclude_given=False), strength=2.0)]), draws=20, seed=0)\n"
             "table = pd.DataFrame(rows).T.round(3).astype(object)\n"
             "table.loc[\"random heads (20 draws)\"] = [control.cell(k) for k in KEYS]\n"
             "for k in KEYS:\n"
             "    lower = k.startswith(\"chair\")\n"
             "    print(f\"{k}: VHR {control.verdict(k, rows['VHR'][k], higher_is_better=not lower)}, \"\n"
             "          f\"fixed-head variant {control.verdict(k, rows['VHR, fixed heads (variant)'][k], higher_is_better=not lower)}\")\n"
             "table"),
    ("md", "## VHD against the organism's ground truth\nThe organism ships the measured effect of scaling each "
           "head alone by 2 (as VHR does) on CHAIR_i and on POPE-adversarial F1."),
    ("code", "truth = pd.read_csv(zoo.ground_truth_path(\"vision\"))\n"
             "merged = scores.to_frame().merge(truth, on=[\"layer\", \"head\"])\n"
             "print(\"Spearman VHD vs CHAIR_i reduction (x2):\", round(merged[\"score\"].corr(-merged[\"change_chair_i_x2\"], method=\"spearman\"), 3))\n"
             "print(\"Spearman VHD vs POPE-adversarial F1 gain (x2):\", round(merged[\"score\"].corr(merged[\"change_pope_adversarial_f1_x2\"], method=\"spearman\"), 3))"),
]

write(cells, "02_vision.ipynb")
