"""Models split over devices (accelerate's device_map): every probe, edit and analyzer gives what
the same model gives undispatched. On CPU the split is real dispatch: layers 1 and 3 are offloaded
to disk (weights on the meta device, loaded by accelerate's hooks at forward time), the rest stays
in RAM."""

import pytest
import torch

pytest.importorskip("accelerate")

from headscope import cli
from headscope.hf import devices
from headscope.analyzers import circuits, pursuit, retrieval, safety
from headscope.errors import HeadscopeError
from headscope.interventions import Edit, intervene
from headscope.model import HeadModel
from headscope.tasks.circuit_pairs import EncodedPairs
from headscope.tasks.needle import NeedleTask

SPLIT = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
         "model.layers.2": "cpu", "model.layers.3": "disk", "model.norm": "cpu", "lm_head": "cpu"}  # lm_head is tied to embed_tokens


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    plain = HeadModel.load("retrieval")
    split = HeadModel.load("retrieval", device_map=SPLIT, offload_folder=str(tmp_path_factory.mktemp("offload")))
    return plain, split


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 60, (2, 24), generator=torch.Generator().manual_seed(0))


def test_split_model_is_really_dispatched(pair):
    plain, split = pair
    assert split.model.hf_device_map["model.layers.1"] == "disk"
    o_proj = split._layers[1].out_proj
    assert o_proj.weight.device.type == "meta" and hasattr(o_proj, "_hf_hook")
    assert torch.equal(devices.weight(o_proj), plain._layers[1].out_proj.weight)
    assert split.device == torch.device("cpu")
    torch.testing.assert_close(split.model(ids_of(plain)).logits, plain.model(ids_of(plain)).logits)


def ids_of(hm):
    return torch.arange(3, 27).view(1, -1)


def test_probes_match(pair, ids):
    outs = []
    for hm in pair:
        with torch.no_grad(), hm.attention_stats(["top1", "entropy", "received"]) as rec:
            hm.model(ids)
        with torch.no_grad(), hm.capture_z(positions="last") as cap:
            hm.model(ids)
        outs.append((rec.top1_index(), rec.stacked("entropy"), rec.stacked("received"), cap.z[3]))
        assert not hm.hooks_installed()
    assert torch.equal(outs[0][0], outs[1][0])
    for a, b in zip(outs[0][1:], outs[1][1:]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("make", [
    lambda: Edit("zero", [(1, 2), (3, 0)]),
    lambda: Edit("scale", [(3, 5)], strength=-1.0, positions="last"),
    lambda: Edit("mean", [(1, 1)], source=[[5, 6, 7, 8, 9]]),
    lambda: Edit("patch", [(3, 4)], source=list(range(10, 34))),
    lambda: Edit("uniform", [(1, 0), (3, 7)], scope="decode"),
    lambda: Edit("query_scale", [(3, 1)], strength=1e-4),
    lambda: Edit("inject", [(1, 2), (3, 5)], strength=[0.7, 0.4], positions="last", scope="prefill",
                 source=torch.randn(4, 8, 16, generator=torch.Generator().manual_seed(2))),
])
def test_edits_match(pair, ids, make):
    logits = []
    for hm in pair:
        with torch.no_grad(), intervene(hm, make()):
            logits.append(hm.model(ids).logits)
            generated = hm.model.generate(ids[:1, :12], max_new_tokens=4, do_sample=False, pad_token_id=2)
        logits.append(generated)
    torch.testing.assert_close(logits[0], logits[2])
    assert torch.equal(logits[1], logits[3])


def test_analyzers_match(pair):
    plain, split = pair
    trials = NeedleTask(plain.tokenizer, lengths=[128], depths=[0, 50, 100], use_chat_template=False).trials()[:4]
    clean = torch.randint(3, 60, (3, 16), generator=torch.Generator().manual_seed(1))
    groups = [EncodedPairs(clean, clean.flip(1), torch.tensor([5, 6, 7]), torch.tensor([8, 9, 10]))]
    results = []
    for hm in pair:
        results.append([
            retrieval.retrieval_heads(hm, trials, progress=False).scores,
            safety.ships_per_query(hm, list(range(5, 25)), heads=[(1, 0), (1, 3), (3, 2)]),
            circuits.activation_patching(hm, groups, heads=[(1, 1), (3, 6)], progress=False).scores,
            circuits.attribution_patching(hm, groups).scores,
            pursuit.head_writes(hm, [list(range(5, 20))]),
            pursuit.unembedding(hm),
        ])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, equal_nan=True)


VISION_SPLIT = {"model.vision_tower": "cpu", "model.multi_modal_projector": "disk",
                "model.language_model.embed_tokens": "cpu", "model.language_model.rotary_emb": "cpu",
                "model.language_model.layers.0": "cpu", "model.language_model.layers.1": "disk",
                "model.language_model.layers.2": "cpu", "model.language_model.layers.3": "disk",
                "model.language_model.norm": "cpu", "lm_head": "cpu"}


def test_vision_model_split(tmp_path):
    """The vision organism with its projector and language layers 1 and 3 on disk: VHD scores, a VHR
    (scale) and a VAR edit give what the undispatched model gives (batch 2, left-padded)."""
    from headscope import vision
    from headscope.analyzers.vision import vision_aware_heads
    from headscope.zoo import organism_path

    folder = organism_path("vision")
    pairs = vision.read_pairs(folder / "prompts.jsonl", folder / "images")[:2]
    images = [vision.load_image(path) for path, _ in pairs]
    prompts = [pairs[0][1], pairs[1][1] + " is there a red square ?"]
    edits = [Edit("scale", [(1, 3), (2, 5)], strength=2.0),
             Edit("var", [], strength=0.6, options={"dims": [0, 5, 9], "tau": 1.6, "rho": 0.4, "first_layer": 1})]
    results = []
    for hm in (HeadModel.load("vision"), HeadModel.load("vision", device_map=VISION_SPLIT, offload_folder=str(tmp_path))):
        batch = vision.encode(hm, images, prompts)
        kwargs = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True,
                      pad_token_id=vision.pad_id(hm))
        with torch.no_grad():
            base = torch.stack(hm.model.generate(**batch, **kwargs).logits)
            with intervene(hm, edits):
                edited = torch.stack(hm.model.generate(**batch, **kwargs).logits)
        results.append((vision_aware_heads(hm, images, prompts).scores, base, edited))
    assert (batch["attention_mask"] == 0).any(), "the batch must be left-padded"
    assert (results[0][2] - results[0][1]).abs().max() > 1e-3, "the edits must change the logits"
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_cli_device_map(tmp_path, capsys):
    import json

    out = tmp_path / "needle.csv"
    code = cli.main(["score", "--task", "needle", "--lengths", "128", "--depths", "50", "--quiet",
                     "--device-map", json.dumps(SPLIT), "--out", str(out)])
    assert code == 0 and out.exists()
    assert cli.main(["score", "--task", "needle", "--device-map", "everywhere"]) == 2
    assert "--device-map must be" in capsys.readouterr().err
    with pytest.raises(HeadscopeError, match="not both"):
        HeadModel.load("retrieval", device="cpu", device_map="auto")
    assert devices.parse_max_memory("0=20GiB,cpu=64GiB") == {0: "20GiB", "cpu": "64GiB"}
    with pytest.raises(HeadscopeError, match="DEVICE=SIZE"):
        devices.parse_max_memory("20GiB")
