"""VAR (Kang et al. 2025) against an eager reference built from the attention weights themselves
(output_attentions), batch 2 with left padding, prefill and decode, by the paper's rule (act only
where an image token is a visual sink) and by the former first-token rule; a planted visual sink on
the vision organism; the exact no-op where the organism has none; the guard case."""

import numpy as np
import pytest
import torch

from headscope import HeadModel, vision
from headscope.analyzers.sinks import sink_scores
from headscope.errors import HeadscopeError
from headscope.interventions import Edit, intervene

PROMPTS = ["USER: <image> describe ASSISTANT:", "USER: <image> is there a red square ? ASSISTANT:"]
OPTIONS = {"dims": [0, 5, 9], "tau": 1.6, "rho": 0.4, "first_layer": 1}
VISION_PROMPTS = ["<image>\ndescribe :", "<image>\nis there a square ?"]
P = 0.6


def images(n, size=40):
    from PIL import Image

    return [Image.fromarray((np.random.RandomState(i).rand(size, size, 3) * 255).astype("uint8")) for i in range(n)]


@pytest.fixture(scope="module")
def llava_path(tmp_path_factory):
    from headscope.zoo.random_vlm import random_llava

    return random_llava(tmp_path_factory.mktemp("llava-var"), layers=3, seed=1)


class Reference:
    """Eager attention with VAR applied to the weights, written from the method's definition."""

    def __init__(self, model, options, p):
        self.model, self.opts, self.p = model, {"min_image_mass": 0.2, "rule": "paper", **options}, p
        self.sinks, self.raw = {}, {}

    def see_inputs(self, module, args, kwargs):
        cache = kwargs.get("cache")
        if cache is None or cache.get_seq_length() == 0:
            self.image = kwargs["input_ids"] == self.model.config.image_token_id
            self.real = kwargs["attention_mask"].bool()
            self.sinks = {}

    def see_block(self, layer):
        def hook(module, args, kwargs):
            h = args[0]
            if layer >= self.opts["first_layer"] and h.shape[1] == self.image.shape[1]:
                sinks = sink_scores(h, self.opts["dims"]) > self.opts["tau"]
                if self.opts["rule"] == "first-token":
                    first = self.real.long().argmax(1)
                    rows = torch.arange(len(first))
                    sinks[rows, first] |= ~self.image[rows, first]  # BOS, unless the prompt starts with the image
                self.sinks[layer] = sinks & self.real
        return hook

    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        groups = query.shape[1] // key.shape[1]
        k, v = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        scores = query @ k.transpose(-1, -2) * scaling
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        elif attention_mask is not None:  # additive
            scores = scores + attention_mask
        A = scores.softmax(-1)
        n_q, n_k = A.shape[2], A.shape[3]
        layer = getattr(module, "layer_idx", None)  # None in the vision tower
        if layer is not None:
            self.raw[layer] = A
        if layer in self.sinks:
            pad = n_k - self.image.shape[1]
            image = torch.nn.functional.pad(self.image, (0, pad))
            sinks = torch.nn.functional.pad(self.sinks[layer], (0, pad))
            B, H = A.shape[:2]
            A = A.clone()
            for b in range(B):
                if self.opts["rule"] == "paper" and not (sinks[b] & image[b]).any():
                    continue  # the paper's rule: no visual sink in this prompt at this layer, no edit
                last = int(image[b].nonzero().max())
                for i in range(n_q):
                    if n_k - n_q + i <= last:
                        continue
                    for h in range(H):
                        row = A[b, h, i]
                        vs, img = row[sinks[b] & image[b]].sum(), row[image[b]].sum()
                        rest = image[b] & ~sinks[b]
                        if img < self.opts["min_image_mass"] or vs / img > self.opts["rho"] or row[rest].sum() == 0:
                            continue
                        freed = (1 - self.p) * row[sinks[b]].sum()
                        new = row.clone()
                        new[sinks[b]] *= self.p
                        new[rest] += freed * row[rest] / row[rest].sum()
                        A[b, h, i] = new
        return (A @ v).transpose(1, 2).contiguous(), A


def reference_model(path, options, p, plant=None):
    import transformers as tf

    model = tf.LlavaForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()
    if plant is not None:
        model.model.multi_modal_projector.register_forward_hook(plant)
    ref = Reference(model, options, p)
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    tf.AttentionInterface.register("var_reference", ref.attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register("var_reference", eager_mask)  # always a full additive mask
    model.set_attn_implementation("var_reference")
    model.register_forward_pre_hook(ref.see_inputs, with_kwargs=True)
    for layer, block in enumerate(model.model.language_model.layers):
        block.register_forward_pre_hook(ref.see_block(layer), with_kwargs=True)
    return model, ref


@pytest.mark.parametrize("rule", ["paper", "first-token"])
@pytest.mark.parametrize("path", ["dense", "streamed"])
def test_var_equals_eager_reference_batch2_left_padded(llava_path, path, rule, monkeypatch):
    # short contexts build the rows' pattern outright; long ones stream through the fused kernel
    from headscope.interventions.kinds import var

    monkeypatch.setattr(var, "DENSE_SCORES", 1 << 30 if path == "dense" else 0)
    hm = HeadModel.load(llava_path)
    batch = vision.encode(hm, images(2), PROMPTS)
    assert (batch["attention_mask"] == 0).any(), "the batch must be left-padded"
    options = {**OPTIONS, "rule": rule}
    edit = Edit("var", [], strength=P, options=options)
    kwargs = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True,
                  pad_token_id=vision.pad_id(hm))
    with torch.no_grad():
        base = hm.model.generate(**batch, **kwargs)
        with intervene(hm, edit):
            ours = hm.model.generate(**batch, **kwargs)
        model, ref = reference_model(llava_path, options, P)
        theirs = model.generate(**batch, **kwargs)
    assert not hm.hooks_installed()
    ours_logits, ref_logits = torch.stack(ours.logits), torch.stack(theirs.logits)
    assert (ours_logits - torch.stack(base.logits)).abs().max() > 1e-3, "VAR must change something here"
    torch.testing.assert_close(ours_logits, ref_logits, atol=1e-5, rtol=1e-5)  # prefill + 2 decode steps

    # the reference rows: sum to 1, sinks times p, and some rows image-centric, some not
    with torch.no_grad():
        A = model(**vision.with_positions(hm, batch), output_attentions=True).attentions[2]
    real_rows = batch["attention_mask"].bool()
    sums = A.sum(-1).permute(0, 2, 1)[real_rows]
    torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-5, rtol=0)
    eager = ref.raw[2]  # the same layer's weights before redistribution
    changed = ~torch.isclose(A, eager, atol=1e-7).all(-1)  # [B, H, rows]
    after = vision.token_groups(hm, batch["input_ids"], batch["attention_mask"])["text_after_image"]
    after = after.unsqueeze(1).expand_as(changed)
    assert not (changed & ~after).any(), "only rows after the image are redistributed"
    assert changed[after].any() and (~changed[after]).any(), "some rows must be image-centric, some not"
    sinks = ref.sinks[2]
    b, h, i = [int(x) for x in changed.nonzero()[0]]
    torch.testing.assert_close(A[b, h, i][sinks[b]], P * eager[b, h, i][sinks[b]], atol=1e-6, rtol=1e-5)


def test_var_guard_leaves_rows_without_non_sink_image_tokens_unchanged(llava_path):
    hm = HeadModel.load(llava_path)
    batch = vision.encode(hm, images(2), PROMPTS)
    # tau below every phi: all tokens are sinks, so no non-sink image token is left; rho 1 and no
    # image-mass floor make every row after the image image-centric, so only the guard can hold
    guard = Edit("var", [], options={**OPTIONS, "tau": -1.0, "rho": 1.0, "min_image_mass": 0.0})
    with torch.no_grad():
        base = hm.model(**vision.with_positions(hm, batch)).logits
        with intervene(hm, guard):
            out = hm.model(**vision.with_positions(hm, batch)).logits
    torch.testing.assert_close(out, base, atol=1e-5, rtol=1e-5)


def test_var_edit_data_and_errors(llava_path):
    edit = Edit("var", [], strength=0.5, options={"dims": [1, 2], "rho": 0.4})
    assert Edit.from_dict(edit.to_dict()) == edit
    with pytest.raises(HeadscopeError, match="unknown VAR option"):
        Edit("var", [], options={"sink_dims": [1]})
    with pytest.raises(HeadscopeError, match="VAR rule must be one of"):
        Edit("var", [], options={"rule": "bos"})
    with pytest.raises(HeadscopeError, match="p \\(strength\\) must be one number in \\[0, 1\\]"):
        Edit("var", [], strength=1.5)
    with pytest.raises(HeadscopeError, match="strength must be a finite number"):  # every kind refuses NaN
        Edit("var", [], strength=float("nan"))
    from conftest import tiny_model

    with pytest.raises(HeadscopeError, match="needs a vision-language model"):
        with intervene(HeadModel(tiny_model("llama")), edit):
            pass


def plant_sink(row: int, token: int, dim: int, value: float = 300.0):
    """A forward hook on LLaVA's projector: one massive entry in one image token of one batch row,
    which the residual stream carries to every layer (a planted visual sink)."""
    def hook(module, args, output):
        output = output.clone()
        output[row, token, dim] += value
        return output
    return hook


@pytest.mark.parametrize("path", ["dense", "streamed"])
def test_var_paper_rule_with_a_planted_visual_sink_equals_eager_reference(path, monkeypatch):
    """The vision organism with a planted sink in one image token of batch row 0 only: VAR (tau
    scaled to d = 64: 2.5) redistributes in row 0 and leaves row 1, which has no visual sink, alone."""
    from headscope.interventions.kinds import var
    from headscope.zoo import organism_path

    monkeypatch.setattr(var, "DENSE_SCORES", 1 << 30 if path == "dense" else 0)
    hm = HeadModel.load("vision")
    assert var.default_tau(hm.geometry.d_model) == 2.5
    batch = vision.encode(hm, images(2, 32), VISION_PROMPTS)
    options = {"dims": [11], "rho": 0.5}  # tau: scaled; first_layer 2; the paper's rule (defaults)
    edit = Edit("var", [], strength=P, options=options)
    kwargs = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True,
                  pad_token_id=vision.pad_id(hm))
    plant = plant_sink(row=0, token=5, dim=11)
    handle = hm.model.model.multi_modal_projector.register_forward_hook(plant)
    try:
        with torch.no_grad():
            base = torch.stack(hm.model.generate(**batch, **kwargs).logits)
            with var.apply(hm, edit) as run:
                ours = torch.stack(hm.model.generate(**batch, **kwargs).logits)
    finally:
        handle.remove()
    model, ref = reference_model(organism_path("vision"), {**options, "tau": 2.5, "first_layer": 2}, P, plant)
    with torch.no_grad():
        theirs = torch.stack(model.generate(**batch, **kwargs).logits)
    image = batch["input_ids"] == hm.model.config.image_token_id
    visual = {layer: (s & image).any(1).tolist() for layer, s in ref.sinks.items()}
    assert visual and all(v == [True, False] for v in visual.values()), visual  # only the planted row
    assert run.visual_sink_layers == 2 and run.rows_edited > 0
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)  # prefill + 2 decode steps
    assert (ours[:, 0] - base[:, 0]).abs().max() > 1e-3, "VAR must change the row with a visual sink"
    torch.testing.assert_close(ours[:, 1], base[:, 1], atol=1e-5, rtol=1e-5)  # no visual sink: untouched


def vision_phi(hm, batch, first_layer=2):
    """phi over every hidden dim of each layer's residual input (layers >= first_layer): max over
    image tokens and over real text tokens."""
    out = hm.model(**vision.with_positions(hm, batch), output_hidden_states=True)
    image = batch["input_ids"] == hm.model.config.image_token_id
    text = batch["attention_mask"].bool() & ~image
    dims = list(range(hm.geometry.d_model))
    phi = torch.stack([sink_scores(h, dims) for h in out.hidden_states[first_layer:-1]])  # [L', B, N]
    return float(phi[:, image].max()), float(phi[:, text].max())


def test_var_is_an_exact_noop_without_visual_sinks_on_the_vision_organism():
    """The organism has no massive activations: VAR's default (massive dims from the sink analyzer,
    the paper's rule) changes no logit by a single bit and warns once. With every dim as a sink dim
    and tau just at the image tokens' max phi, only text tokens can pass: still a no-op by the
    paper's rule, while the former first-token rule moves mass off BOS and changes the logits."""
    from headscope.interventions.kinds.var import var_edit

    hm = HeadModel.load("vision")
    batch = vision.encode(hm, images(2, 32), VISION_PROMPTS)
    kwargs = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True,
                  pad_token_id=vision.pad_id(hm))
    with torch.no_grad():
        base = torch.stack(hm.model.generate(**batch, **kwargs).logits)
        default = var_edit(hm, batch)
        assert default.options["dims"] == []  # no massive activations in this organism
        with pytest.warns(UserWarning, match="no visual sink") as caught:
            with intervene(hm, default):
                out = torch.stack(hm.model.generate(**batch, **kwargs).logits)
        assert len([w for w in caught if "no visual sink" in str(w.message)]) == 1
        assert torch.equal(out, base)

        image_max, text_max = vision_phi(hm, batch)
        assert image_max < hm.geometry.d_model ** 0.5  # the ceiling sqrt(d)
        all_dims = {"dims": list(range(hm.geometry.d_model)), "tau": image_max}
        with pytest.warns(UserWarning, match="no visual sink"):
            with intervene(hm, Edit("var", [], strength=P, options=all_dims)):
                paper = torch.stack(hm.model.generate(**batch, **kwargs).logits)
        assert torch.equal(paper, base)
        with intervene(hm, Edit("var", [], strength=P, options={**all_dims, "rule": "first-token"})):
            former = torch.stack(hm.model.generate(**batch, **kwargs).logits)
        assert (former - base).abs().max() > 1e-4
