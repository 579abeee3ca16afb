"""Writes notebooks/03_soft_injection.ipynb; CI executes it (tests/test_notebooks.py).

    python notebooks/make_soft_injection.py --execute    # with outputs (how it is committed)
"""

from build import write

cells = [
    ("md", "# Soft injection of task embeddings\n\nA task given by examples, done from a zero-shot prompt "
           "(Park & Rhee 2025): average each head's output at the last token of 10-shot prompts (the task "
           "embedding m), then learn one weight alpha per head and write (1 - alpha) z + alpha m into the last "
           "token of a 0-shot prompt. The learned alphas say which heads carry the task. The model is the shipped "
           "*icl organism* (`python -m headscope.zoo.train_icl`): sixteen tasks over one vocabulary that it "
           "never saw in training, each a palette of six of sixteen colours (the answer: the object's favourite "
           "colour in the palette), so a 0-shot query does not say which task is meant, one demonstration fits "
           "most palettes, and even ten leave the palette partly unknown."),
    ("code", "import torch\n"
             "from headscope import HeadModel, zoo\n"
             "from headscope.tasks.icl import IclTask, PromptFormat\n"
             "from headscope.methods.soft_injection import task_embedding, fit_soft_selection, accuracy\n\n"
             "hm = HeadModel.load(\"icl\")\n"
             "task = IclTask.load(zoo.organism_path(\"icl\") / \"taska.jsonl\", seed=0)\n"
             "demos, query = task.examples(\"test\", 2)[0]\n"
             "print(PromptFormat().prompt(demos, query[0]))"),
    ("md", "## 0-shot, 1-shot and 10-shot\nEvery test query once (100), demonstrations from the train split."),
    ("code", "for k in (0, 1, 10):\n    print(f\"{k}-shot:\", accuracy(hm, task, k))"),
    ("md", "## Task embedding and soft head selection\nN = 50 random 10-shot prompts; theta trained with the "
           "model frozen (Adam, lr 0.2; fewer steps than the default 400 to keep this notebook quick)."),
    ("code", "emb = task_embedding(hm, task, progress=False)\n"
             "emb = fit_soft_selection(hm, task, emb, steps=100, progress=False)\n"
             "print(\"best validation step\", emb.meta[\"best_step\"], \"val accuracy\", emb.meta[\"val_accuracy\"])\n"
             "emb.save(\"taska.safetensors\")\n"
             "emb.scores().heatmap(title=\"learned alpha per head\")"),
    ("code", "print(\"0-shot + injection:\", accuracy(hm, task, 0, edits=emb.edit()))\n"
             "print(\"all alpha = 1:     \", accuracy(hm, task, 0, edits=emb.edit(1.0)))"),
    ("md", "## Generate with the embedding injected\nThe edit is data: it composes with other edits and "
           "applies to `generate()` (prefill only)."),
    ("code", "from headscope.interventions import intervene\n"
             "ids = hm.tokenizer(PromptFormat().prompt([], query[0]), return_tensors=\"pt\").input_ids\n"
             "with torch.no_grad(), intervene(hm, emb.edit()):\n"
             "    out = hm.model.generate(ids, max_new_tokens=1, do_sample=False)\n"
             "print(query, \"->\", hm.tokenizer.decode(out[0, ids.shape[1]:]))"),
    ("md", "## Against the organism's ground truth\nThe measured effect of zeroing each head on 10-shot accuracy."),
    ("code", "import pandas as pd\n"
             "from headscope import HeadScores\n"
             "truth = pd.read_csv(zoo.ground_truth_path(\"icl\"))\n"
             "drop = torch.zeros(hm.geometry.n_layers, hm.geometry.n_heads)\n"
             "for r in truth.itertuples():\n"
             "    drop[r.layer, r.head] = -r.effect_taska\n"
             "emb.scores().compare(HeadScores(drop, \"ablation drop\"), k=4)"),
]

write(cells, "03_soft_injection.ipynb")
