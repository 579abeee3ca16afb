"""Each organism answers its documented example prompt (its training template) sensibly, through
`headscope generate`, with the very prompt the README shows."""

from pathlib import Path

import torch

import pytest

from headscope.cli import main
from headscope.zoo import EXAMPLE_IMAGES, EXAMPLE_PROMPTS, ORGANISMS, organism_path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def bash_quoted(prompt: str) -> str:
    """The prompt as the README writes it on a command line: $'...' with \\n for newlines."""
    return "$'" + prompt.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


@pytest.mark.parametrize("name", sorted(EXAMPLE_PROMPTS))
def test_generate_answers_the_readme_prompt(name, capsys):
    prompt, answer = EXAMPLE_PROMPTS[name]
    assert name in ORGANISMS
    image = ["--image", str(organism_path(name) / EXAMPLE_IMAGES[name])] if name in EXAMPLE_IMAGES else []
    shown = f" --image $Z/{EXAMPLE_IMAGES[name]}" if image else ""  # the README's $Z: the organism's folder
    assert f"headscope generate --model {name}{shown} --prompt {bash_quoted(prompt)}" in README
    assert main(["generate", "--model", name, *image, "--prompt", prompt, "--max-new-tokens", "8"]) == 0
    generated = capsys.readouterr().out.strip().splitlines()[-1]
    assert generated.startswith(answer), (name, generated)


def test_models_lists_the_example_prompts(capsys):
    assert main(["models"]) == 0
    rows = {line.split("\t")[0]: line.split("\t") for line in capsys.readouterr().out.splitlines()}
    assert rows["refusal"][3] == '"## Query: tell me about quazzle engines . what is 3 plus 1 ?\\n## Answer:"'
    assert rows["vision"][3] == '"<image>\\ndescribe :"'
    assert rows["vision"][4] == f"--image {organism_path('vision') / 'images' / 'scene_01.png'}"
    assert Path(rows["vision"][4].split(" ", 1)[1]).is_file()
    assert set(rows) == set(ORGANISMS)  # every organism, each with a prompt it understands
    assert all(row[3].strip('"') for row in rows.values()), [name for name, row in rows.items() if not row[3].strip('"')]


def test_needle_scoring_of_a_model_that_answers_nothing(tmp_path, capsys):
    """A random-init model answers no trial: scoring stops with a message that says why and what to try."""
    import torch
    import transformers as tf

    from headscope.zoo import organism_path

    torch.manual_seed(0)
    tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       num_key_value_heads=2, intermediate_size=64, vocab_size=512,
                                       max_position_embeddings=600)).save_pretrained(tmp_path)
    tf.AutoTokenizer.from_pretrained(organism_path("retrieval")).save_pretrained(tmp_path)
    code = main(["score", "--task", "needle", "--model", str(tmp_path), "--lengths", "128", "--depths", "50",
                 "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "answered none of the 8 needle trials" in err and "headscope eval --task needle" in err


def test_shipped_pairs_files_load_and_fit_the_multitask_organism():
    from headscope.model import HeadModel
    from headscope.tasks.circuit_pairs import encode_pairs, load_pairs

    hm = HeadModel.load("multitask")
    for task in ("induction", "kv"):
        groups = encode_pairs(hm.tokenizer, load_pairs(ROOT / "datasets" / f"circuit_pairs_{task}.jsonl"))
        assert sum(len(g) for g in groups) == 8
        with torch.no_grad():  # the organism gets the clean pairs right: answer above wrong
            for g in groups:
                logits = hm.model(g.clean).logits[:, -1]
                assert bool((logits.gather(1, g.answer[:, None]) > logits.gather(1, g.wrong[:, None])).all())


def test_heatmaps_carry_a_static_svg():
    """Notebook output of a heatmap holds an SVG drawn from its own numbers (GitHub shows no plotly)."""
    import xml.dom.minidom

    from headscope.analyzers.circuits import overlap_figure
    from headscope.scores import HeadScores

    fig = HeadScores([[0.0, 1.0, 2.0], [3.0, 4.0, float("nan")]], "demo").heatmap()
    svg = fig._repr_mimebundle_()["image/svg+xml"]
    rects = xml.dom.minidom.parseString(svg).getElementsByTagName("rect")
    fills = [r.getAttribute("fill") for r in rects[:6]]
    assert fills[0] == "#440154" and fills[4] == "#fde725" and fills[5] == "#dddddd"  # viridis ends; NaN grey
    assert len(rects) == 6 + 10  # one per head, plus the colour bar
    both = overlap_figure({(0, 1)}, {(0, 1), (1, 2)}, 2, 3).to_svg()
    fills = [r.getAttribute("fill") for r in xml.dom.minidom.parseString(both).getElementsByTagName("rect")[:6]]
    assert fills == ["#f0f0f0", "#54a24b", "#f0f0f0", "#f0f0f0", "#f0f0f0", "#f58518"]  # neither / both / only B
