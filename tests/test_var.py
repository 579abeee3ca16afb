"""VAR (Kang et al. 2025) against an eager reference built from the attention weights themselves
(output_attentions), batch 2 with left padding, prefill and decode; the guard case."""

import numpy as np
import pytest
import torch

from headscope import HeadModel, vision
from headscope.analyzers.sinks import sink_scores
from headscope.errors import HeadscopeError
from headscope.interventions import Edit, intervene

PROMPTS = ["USER: <image> describe ASSISTANT:", "USER: <image> is there a red square ? ASSISTANT:"]
OPTIONS = {"dims": [0, 5, 9], "tau": 1.6, "rho": 0.4, "first_layer": 1}
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
        self.model, self.opts, self.p = model, {"min_image_mass": 0.2, "first_token_sink": True, **options}, p
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


def reference_model(path, options, p):
    import transformers as tf

    model = tf.LlavaForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()
    ref = Reference(model, options, p)
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    tf.AttentionInterface.register("var_reference", ref.attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register("var_reference", eager_mask)  # always a full additive mask
    model.set_attn_implementation("var_reference")
    model.register_forward_pre_hook(ref.see_inputs, with_kwargs=True)
    for layer, block in enumerate(model.model.language_model.layers):
        block.register_forward_pre_hook(ref.see_block(layer), with_kwargs=True)
    return model, ref


@pytest.mark.parametrize("path", ["dense", "streamed"])
def test_var_equals_eager_reference_batch2_left_padded(llava_path, path, monkeypatch):
    # short contexts build the rows' pattern outright; long ones stream through the fused kernel
    from headscope.interventions.kinds import var

    monkeypatch.setattr(var, "DENSE_SCORES", 1 << 30 if path == "dense" else 0)
    hm = HeadModel.load(llava_path)
    batch = vision.encode(hm, images(2), PROMPTS)
    assert (batch["attention_mask"] == 0).any(), "the batch must be left-padded"
    edit = Edit("var", [], strength=P, options=OPTIONS)
    kwargs = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True,
                  pad_token_id=vision.pad_id(hm))
    with torch.no_grad():
        base = hm.model.generate(**batch, **kwargs)
        with intervene(hm, edit):
            ours = hm.model.generate(**batch, **kwargs)
        model, ref = reference_model(llava_path, OPTIONS, P)
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
    with pytest.raises(HeadscopeError, match="p \\(strength\\) must be one number in \\[0, 1\\]"):
        Edit("var", [], strength=1.5)
    with pytest.raises(HeadscopeError, match="strength must be a finite number"):  # every kind refuses NaN
        Edit("var", [], strength=float("nan"))
    from conftest import tiny_model

    with pytest.raises(HeadscopeError, match="needs a vision-language model"):
        with intervene(HeadModel(tiny_model("llama")), edit):
            pass
