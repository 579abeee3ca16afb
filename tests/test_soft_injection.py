"""Soft injection (Park & Rhee 2025): the edit against a hand computation, gradients through it,
task data, embedding files, and bad input."""

import json

import pytest
import torch
import transformers as tf

from headscope.errors import HeadscopeError
from headscope.interventions import Edit, intervene, load_edits, save_edits
from headscope.methods.soft_injection import TaskEmbedding, accuracy, fit_soft_selection, task_embedding
from headscope.model import HeadModel
from headscope.tasks.icl import IclTask, PromptFormat, encode
from headscope.zoo.training import build_word_tokenizer

L, H, D = 2, 4, 16
PAIRS = [(f"in{chr(97 + i)}", f"out{chr(97 + (i * 7) % 20)}") for i in range(20)]


@pytest.fixture(scope="module")
def tokenizer():
    texts = [PromptFormat().prompt([p], p[0]) for p in PAIRS]
    return build_word_tokenizer(texts)


def _model(bias: bool, vocab: int) -> HeadModel:
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=64, num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=vocab, max_position_embeddings=256, attention_bias=bias)
    model = tf.LlamaForCausalLM(cfg)
    model.set_attn_implementation("sdpa")
    if bias:  # a visible o_proj bias, so dropping it (the reference's bug) would show
        for layer in model.model.layers:
            torch.nn.init.normal_(layer.self_attn.o_proj.bias, std=0.5)
    return HeadModel(model.eval())


@pytest.fixture(scope="module")
def task():
    return IclTask("toy", PAIRS, seed=0)


def _batch(tokenizer, task):
    """Batch 2 with different prompt lengths: the shorter row is left-padded."""
    examples = [(task["train"][:2], task["test"][0]), (task["train"][2:3], task["test"][1])]
    batch = encode(tokenizer, examples)
    assert (batch.attention_mask[1] == 0).any() or (batch.attention_mask[0] == 0).any()
    return batch


def _hand_logits(hm, batch, vectors, alphas, extra=None):
    """Reference: our own pre-hook on each o_proj replaces z at the last position by
    (1 - alpha) z + alpha m (then ``extra(layer, z)``); o_proj then adds its bias as usual."""
    handles = []
    for layer, block in enumerate(hm.model.model.layers):
        def pre(module, args, layer=layer):
            z = args[0].view(*args[0].shape[:-1], H, D)
            a = alphas[layer].view(1, H, 1)
            last = (1 - a) * z[:, -1] + a * vectors[layer]
            z = torch.cat([z[:, :-1], last[:, None]], dim=1)
            if extra is not None:
                z = extra(layer, z)
            return (z.reshape(args[0].shape),)
        handles.append(block.self_attn.o_proj.register_forward_pre_hook(pre))
    try:
        return _run(hm, batch)
    finally:
        for h in handles:
            h.remove()


def _run(hm, batch):
    pos = (batch.attention_mask.cumsum(-1) - 1).clamp_min(0)
    return hm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=pos).logits


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "o_proj-bias"])
def test_injection_equals_hand_computation(tokenizer, task, bias):
    hm = _model(bias, len(tokenizer))
    batch = _batch(tokenizer, task)
    gen = torch.Generator().manual_seed(3)
    emb = TaskEmbedding(torch.randn(L, H, D, generator=gen), {"model": "tiny"}, torch.rand(L, H, generator=gen))
    with torch.no_grad():
        want = _hand_logits(hm, batch, emb.vectors, emb.alphas)
        with intervene(hm, emb.edit()):
            got = _run(hm, batch)
        plain = _run(hm, batch)
    real = batch.attention_mask.bool()
    assert (got - want)[real].abs().max() < 1e-6
    assert (got - plain)[:, -1].abs().max() > 1e-2  # the injection does change the answer's logits
    assert (got - plain)[:, :-1][real[:, :-1]].abs().max() < 1e-6  # ... and nothing before the last token


def test_injection_composes_with_other_edits(tokenizer, task):
    hm = _model(True, len(tokenizer))
    batch = _batch(tokenizer, task)
    emb = TaskEmbedding(torch.randn(L, H, D), {}, torch.rand(L, H))

    def zero_head(layer, z):
        return torch.cat([z[:, :, :2], torch.zeros_like(z[:, :, 2:3]), z[:, :, 3:]], dim=2) if layer == 1 else z

    with torch.no_grad():
        want = _hand_logits(hm, batch, emb.vectors, emb.alphas, extra=zero_head)
        with intervene(hm, [emb.edit(), Edit("zero", [(1, 2)])]):
            got = _run(hm, batch)
    assert (got - want)[batch.attention_mask.bool()].abs().max() < 1e-6


def test_injection_is_prefill_only_in_generate(tokenizer, task):
    hm = _model(False, len(tokenizer))
    emb = TaskEmbedding(torch.randn(L, H, D) * 3, {}, torch.ones(L, H))
    batch = _batch(tokenizer, task)
    with torch.no_grad():
        with intervene(hm, emb.edit()):
            out = hm.model.generate(batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=3,
                                    do_sample=False, pad_token_id=tokenizer.pad_token_id)
        # hand: the injected prefill picks token 1; then plain decoding of the extended prompt
        first = _hand_logits(hm, batch, emb.vectors, emb.alphas)[:, -1].argmax(-1)
        ids = torch.cat([batch.input_ids, first[:, None]], 1)
        mask = torch.cat([batch.attention_mask, torch.ones_like(first)[:, None]], 1)
        rest = hm.model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(out, rest)


def test_theta_gets_gradients_through_the_edit(tokenizer, task):
    hm = _model(True, len(tokenizer))
    batch = _batch(tokenizer, task)
    vectors = torch.randn(L, H, D)
    theta = torch.randn(L, H, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    with intervene(hm, TaskEmbedding(vectors).edit(torch.sigmoid(theta))):
        loss = torch.nn.functional.cross_entropy(_run(hm, batch)[:, -1], batch.target)
    (grad,) = torch.autograd.grad(loss, theta)
    theta_hand = theta.detach().clone().requires_grad_(True)
    hand = torch.nn.functional.cross_entropy(_hand_logits(hm, batch, vectors, torch.sigmoid(theta_hand))[:, -1], batch.target)
    (want,) = torch.autograd.grad(hand, theta_hand)
    assert (grad != 0).all()
    assert torch.allclose(grad, want, atol=1e-6)


def test_inject_edit_is_data(tmp_path):
    edit = TaskEmbedding(torch.randn(L, H, D), {}, torch.rand(L, H)).edit()
    assert edit.kind == "inject" and edit.positions == "last" and edit.scope == "prefill"
    assert load_edits(save_edits(edit, tmp_path / "e.json")) == [edit]
    with pytest.raises(HeadscopeError, match="inject edit needs source"):
        Edit("inject", [(0, 0)])


# ------------------------------------------------------------------ task data
def test_split_is_seeded_and_disjoint(task):
    again = IclTask("toy", PAIRS, seed=0)
    other = IclTask("toy", PAIRS, seed=1)
    assert task.splits == again.splits and task.splits != other.splits
    sizes = [len(task[s]) for s in ("train", "val", "test")]
    assert sizes == [10, 5, 5]
    assert not set(task["train"]) & set(task["test"]) and not set(task["val"]) & set(task["test"])
    for demos, query in task.examples("test", 3, seed=0):
        assert len(demos) == 3 and query not in demos and set(demos) <= set(task["train"])


def test_prompt_format_and_options(tokenizer):
    fmt = PromptFormat()
    assert fmt.prompt([("a", "b"), ("c", "d")], "e") == "Q: a\nA: b\n\nQ: c\nA: d\n\nQ: e\nA:"
    assert fmt.target("b") == " b"
    other = PromptFormat(template="input: {x} output: {y}", separator=" | ")
    assert other.prompt([("a", "b")], "e") == "input: a output: b | input: e output:"
    with pytest.raises(HeadscopeError, match="end with one"):
        PromptFormat(template="{y} then {x}")
    with pytest.raises(HeadscopeError, match="no chat template"):
        encode(tokenizer, [([], PAIRS[0])], PromptFormat(chat=True))


def test_encode_left_pads_and_finds_the_first_target_token(tokenizer, task):
    batch = _batch(tokenizer, task)
    for row in range(2):
        x, y = task["test"][row]
        assert batch.target[row] == tokenizer.convert_tokens_to_ids(y)
        real = batch.input_ids[row][batch.attention_mask[row].bool()]
        assert tokenizer.decode(real[-3:]) .split()[-1] == ":" and batch.attention_mask[row, -1] == 1


def test_embedding_file_roundtrip_and_mean_of_last_token(tokenizer, task, tmp_path):
    hm = HeadModel(_model(False, len(tokenizer)).model, tokenizer, name="tiny")
    emb = task_embedding(hm, task, k=2, n=6, batch_size=4, progress=False)
    # the mean of z at the last token, one prompt at a time
    zs = []
    for example in task.examples("train", 2, n=6, seed=0):
        b = encode(tokenizer, [example])
        with torch.no_grad(), hm.capture_z(positions="last") as cap:
            _run(hm, b)
        zs.append(torch.stack([cap.z[l][0, 0] for l in range(L)]))
    assert torch.allclose(emb.vectors, torch.stack(zs).mean(0), atol=1e-5)
    emb.alphas = torch.rand(L, H)
    path = emb.save(tmp_path / "task.safetensors")
    back = TaskEmbedding.load(path)
    assert torch.equal(back.vectors, emb.vectors) and torch.equal(back.alphas, emb.alphas)
    assert {k: back.meta[k] for k in ("model", "task", "k", "n", "seed")} == {"model": "tiny", "task": "toy", "k": 2, "n": 6, "seed": 0}
    assert back.meta["template"] == PromptFormat().to_dict()
    assert back.scores().top(1)[0] == divmod(int(emb.alphas.argmax()), H)


# ------------------------------------------------------------------ bad input
def test_bad_task_files(tmp_path):
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"input": "a", "output": "b"}\n{"input": "c"}\n')
    with pytest.raises(HeadscopeError, match=r"missing.jsonl:2 lacks 'input' or 'output'"):
        IclTask.load(missing)
    small = tmp_path / "small.jsonl"
    small.write_text('{"input": "a", "output": "b"}\n{"input": "c", "output": "d"}\n')
    with pytest.raises(HeadscopeError, match="split is empty.*add pairs"):
        IclTask.load(small)
    with pytest.raises(HeadscopeError, match="10 train pairs, fewer than 13 shots; use fewer shots"):
        IclTask("toy", PAIRS).examples("test", 13)


def test_target_outside_the_vocabulary(tokenizer):
    with pytest.raises(HeadscopeError, match="tokenizes to nothing.*made for this model's vocabulary"):
        encode(tokenizer, [([], ("ina", "ZZZ"))])


def test_embedding_for_another_model(tokenizer, task):
    hm = _model(False, len(tokenizer))
    emb = TaskEmbedding(torch.randn(3, H, D), {"model": "other"}, torch.rand(3, H))
    with pytest.raises(HeadscopeError, match="made for other.*fit one for this model"):
        emb.check(hm)
    with pytest.raises(HeadscopeError, match="made for another model"):
        with intervene(hm, emb.edit()):
            pass


# ------------------------------------------------------------------ command line
@pytest.fixture(scope="module")
def cli_files(tmp_path_factory, tokenizer):
    """A tiny random-init model folder with its word tokenizer, and a task file in its vocabulary."""
    folder = tmp_path_factory.mktemp("inject")
    hm = _model(True, len(tokenizer))
    hm.model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    (folder / "toy.jsonl").write_text("".join(json.dumps({"input": x, "output": y}) + "\n" for x, y in PAIRS))
    return folder


def _cli(capsys, *argv):
    from headscope.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_fit_eval_generate(cli_files, capsys):
    model, task, emb = cli_files / "model", cli_files / "toy.jsonl", cli_files / "toy.safetensors"
    code, out, err = _cli(capsys, "inject", "fit", "--model", model, "--task", task, "--shots", 3, "--prompts", 4,
                          "--steps", 10, "--out", emb, "--quiet")
    assert code == 0, err
    assert TaskEmbedding.load(emb).meta["k"] == 3 and f"wrote {emb}" in out
    for extra in ([], ["--shots", "3"], ["--inject", emb]):
        code, out, err = _cli(capsys, "eval", "--task", "icl", "--model", model, "--tasks", task, "--quiet", *extra)
        assert code == 0, err
        assert out.strip().splitlines()[-1].startswith("accuracy: ")
    code, out, err = _cli(capsys, "generate", "--model", model, "--inject", emb, "--prompt", "Q: ina\nA:",
                          "--max-new-tokens", 1)
    assert code == 0 and "edit: inject on 8 heads" in out, err


@pytest.mark.parametrize("case", ["missing-key", "empty-split", "too-few", "foreign-vocab", "other-model"])
def test_cli_bad_input_is_one_line(cli_files, capsys, case, tmp_path):
    model, task = cli_files / "model", cli_files / "toy.jsonl"
    bad = tmp_path / "bad.jsonl"
    if case == "missing-key":
        bad.write_text('{"input": "ina", "answer": "outa"}\n')
        argv, fix = ["inject", "fit", "--model", model, "--task", bad, "--out", tmp_path / "e.safetensors"], "each line must be"
    elif case == "empty-split":
        bad.write_text('{"input": "ina", "output": "outa"}\n{"input": "inb", "output": "outb"}\n')
        argv, fix = ["eval", "--task", "icl", "--model", model, "--tasks", bad], "add pairs"
    elif case == "too-few":
        argv, fix = ["inject", "fit", "--model", model, "--task", task, "--shots", 12, "--out", tmp_path / "e.safetensors"], "use fewer shots"
    elif case == "foreign-vocab":
        bad.write_text("".join(json.dumps({"input": f"ant{i}", "output": f"word{i}"}) + "\n" for i in range(8)))
        argv, fix = ["eval", "--task", "icl", "--model", model, "--tasks", bad], "made for this model's vocabulary"
    else:
        other = tmp_path / "other.safetensors"
        TaskEmbedding(torch.randn(3, H, D), {"model": "elsewhere"}, torch.rand(3, H)).save(other)
        argv, fix = ["eval", "--task", "icl", "--model", model, "--tasks", task, "--inject", other], "fit one for this model"
    code, out, err = _cli(capsys, *argv, "--quiet")
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and fix in err, err
