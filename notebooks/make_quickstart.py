"""Writes notebooks/01_quickstart.ipynb; CI executes it (tests/test_notebooks.py).

    python notebooks/make_quickstart.py --execute    # with outputs (how it is committed)
"""

from build import write

cells = [
    ("md", "# headscope quickstart: retrieval heads\n\nLoad a model, score its retrieval heads "
           "(Wu et al. 2024) on a needle in a haystack, export the ranking, ablate the top heads and "
           "watch retrieval break. The default model is the shipped *retrieval organism*: a tiny Llama "
           "(GQA) trained by `python -m headscope.zoo.train_retrieval`, so nothing is downloaded. "
           "For your own model use `HeadModel.load(\"path/or/hub-id\")`."),
    ("code", "from headscope import HeadModel, NeedleTask, retrieval_heads, needle_accuracy, accuracy_heatmap\n"
             "from headscope import zoo\n\n"
             "hm = HeadModel.load(\"retrieval\")\nhm"),
    ("md", "## The haystack grid\nContext lengths x needle depths x needles; the organism carries its "
           "trained grid."),
    ("code", "grid = zoo.organism_info(\"retrieval\")[\"needle\"]\n"
             "task = NeedleTask(hm.tokenizer, lengths=grid[\"lengths\"], depths=grid[\"depths\"])\n"
             "trials = task.trials()\n"
             "print(len(trials), \"trials; first prompt:\")\n"
             "print(hm.tokenizer.decode(trials[0].prompt_ids)[:300], \"...\")"),
    ("code", "records = needle_accuracy(hm, trials, progress=False)\n"
             "print(\"accuracy:\", records[\"correct\"].mean())\n"
             "accuracy_heatmap(records)"),
    ("md", "## Score every head\nTeacher-forced (one forward pass per trial, headscope's default) "
           "or `variant=\"decode\"` (the reference's greedy loop)."),
    ("code", "scores = retrieval_heads(hm, trials, progress=False)\n"
             "scores.heatmap()"),
    ("code", "scores.to_frame().head(8)"),
    ("code", "scores.to_csv(\"ranking.csv\")\nopen(\"ranking.csv\").read().splitlines()[:5]"),
    ("md", "## Ablate the top heads\nZero the output of the 3 best retrieval heads (10% of the heads) "
           "and compare with 3 random other heads."),
    ("code", "import random\n"
             "from headscope.heads import format_heads\n"
             "top = scores.top(3)\n"
             "with hm.ablate(top):\n"
             "    ablated = needle_accuracy(hm, trials, progress=False)\n"
             "others = [h for h in hm.all_heads() if h not in top]\n"
             "with hm.ablate(random.Random(0).sample(others, 3)):\n"
             "    control = needle_accuracy(hm, trials, progress=False)\n"
             "print(f\"top-3 ablated: {ablated['correct'].mean():.2f}   3 random ablated: {control['correct'].mean():.2f}\")\n"
             "accuracy_heatmap(ablated, title=f\"accuracy with {format_heads(top)} ablated\")"),
    ("md", "## Against the organism's ground truth\nThe measured accuracy drop when each head alone "
           "is ablated (`python -m headscope.zoo.ground_truth retrieval`)."),
    ("code", "import pandas as pd, torch\n"
             "from headscope import HeadScores\n"
             "truth = pd.read_csv(zoo.ground_truth_path(\"retrieval\"))\n"
             "drop = torch.zeros(hm.geometry.n_layers, hm.geometry.n_heads)\n"
             "for r in truth.itertuples():\n"
             "    drop[r.layer, r.head] = r.drop\n"
             "scores.compare(HeadScores(drop, \"ablation drop\"), k=3)"),
]

write(cells, "01_quickstart.ipynb")
