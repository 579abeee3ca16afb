"""Bad input aimed at edits and at the CLI's other user inputs: edits checked against the model before
their first forward (heads, layers, dims, token ids), edits that break the model stopped with an error
naming them, images, format fields and devices refused with one line (the pattern of test_bad_input).

Each CLI case runs ``headscope.cli.main(argv)`` in-process: exit status 2 with one ``error: ...`` line
holding a fragment. ``early`` cases must fail before any model weights load.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch

from conftest import png_claiming
from test_bad_input import run_case

from headscope import zoo
from headscope.errors import HeadscopeError
from headscope.interventions import Edit, TaskEmbedding, intervene
from headscope.model import HeadModel
from headscope.scores import HeadScores

GEN = ["generate", "--prompt", "The secret", "--max-new-tokens", "2"]
SCENE = str(zoo.organism_path("vision") / "images" / "scene_01.png")
VGEN = ["generate", "--model", "vision", "--image", SCENE, "--prompt", "<image>\ndescribe :", "--max-new-tokens", "2"]
ICL = ["eval", "--task", "icl", "--quiet"]
HALL = ["eval", "--task", "hallucination", "--quiet", "--scenes", "1"]
VHD = ["score", "--task", "vhd", "--quiet"]
NO_CUDA = not torch.cuda.is_available()

# (id, argv, fragment of the one error line, early)
CASES = [
    # ---- edits files: checked against the model before the first forward
    ("edits-zero-no-heads", [*GEN, "--edits", "{zero_empty}"], "zero edit needs at least one head", True),
    ("edits-scale-no-heads", [*GEN, "--edits", "{scale_empty}"], "scale edit needs at least one head", True),
    ("edits-head-twice", [*GEN, "--edits", "{zero_twice}"], "L0H0 listed more than once", True),
    ("edits-patch-token-1e12", [*GEN, "--edits", "{patch_big_id}"],
     "patch edit: source token id 1000000000000 is outside this model's vocabulary (ids 0..", False),
    ("edits-mean-token-negative", [*GEN, "--edits", "{mean_negative_id}"],
     "mean edit: source token id -1 is outside this model's vocabulary", False),
    ("edits-var-dims-99999", [*VGEN, "--edits", "{var_dims}"], "VAR option dims: [99999] outside this model's hidden "
     "dims 0..", False),
    ("edits-var-layers-7", [*VGEN, "--edits", "{var_layers}"], "VAR option layers: [7] not within this model's layers "
     "0..3", False),
    ("edits-var-first-layer-9", [*VGEN, "--edits", "{var_first}"], "VAR option first_layer 9 is outside this model's "
     "layers 0..3", False),
    ("vhr-csv-layers-7", [*VGEN, "--vhr", "{vhd_csv}", "--vhr-layers", "7"], "--vhr-layers must be layers within 0..3",
     False),
    # ---- edits too strong for the model
    ("scale-alpha-1e300", [*GEN, "--scale", "--heads", "L0H0", "--alpha", "1e300"], "beyond float32's range", True),
    ("scale-alpha-1e30", [*GEN, "--scale", "--heads", "L0H0,L1H1", "--alpha", "1e30"],
     "under the edit(s) scale on 2 heads (L0H0, L1H1), strength 1e+30", False),
    ("eval-scale-alpha-1e30", ["eval", "--task", "needle", "--quiet", "--lengths", "64", "--depths", "50", "--scale",
                               "--heads", "L0H0,L1H1", "--alpha", "1e30"], "logits turned", False),
    ("inject-alphas-1e30", [*ICL, "--tasks", "{icl_small}", "--inject", "{emb_huge}"],
     "under the edit(s) inject on 16 heads", False),
    # ---- images
    ("image-bomb-header", ["generate", "--model", "vision", "--image", "{bomb}", "--prompt", "<image> x"],
     "possible decompression bomb", True),
    ("image-over-limit", ["generate", "--model", "vision", "--image", "{big}", "--prompt", "<image> x"],
     "larger than 67,108,864 pixels", True),
    ("vhd-images-bomb", [*VHD, "--images", "{bomb_dir}", "--prompts", "{vhd_prompts}"], "possible decompression bomb",
     True),
    ("vision-prompt-without-image", ["generate", "--model", "vision", "--prompt", "<image>\ndescribe :"],
     "no --image was given", False),
    # ---- format fields
    ("question-prompt-other-field", [*HALL, "--question-prompt", "<image> is there a {obj} or a {object} ?"],
     "the only field allowed is {object}", True),
    ("question-prompt-empty-field", [*HALL, "--question-prompt", "<image> {} is there a {object} ?"],
     "the only field allowed is {object}", True),
    ("question-prompt-bad-spec", [*HALL, "--question-prompt", "<image> is there a {object:d} {object} ?"],
     "the only field allowed is {object}", True),
    # ---- devices that do not exist here
    ("device-map-tpu", [*GEN, "--device-map", '{"": "tpu"}'], "'tpu' is not a torch device", True),
    ("device-map-list", [*GEN, "--device-map", '{"": [0]}'], "must be \"cpu\", \"disk\"", True),
]
NO_GPU_CASES = [  # valid where the device exists
    ("device-map-cuda0", [*GEN, "--device-map", '{"": "cuda:0"}'], "CUDA is not available", True),
    ("device-map-index-7", [*GEN, "--device-map", '{"": 7}'], "device 7 does not exist", True),
    ("max-memory-gpu0", [*GEN, "--max-memory", "0=20GiB"], "--max-memory device 0 does not exist", True),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad_edits")
    f = {}

    def edits(name: str, data) -> None:
        (tmp / f"{name}.json").write_text(json.dumps(data))
        f[name] = str(tmp / f"{name}.json")

    edits("zero_empty", [{"kind": "zero", "heads": []}])
    edits("zero_twice", [{"kind": "zero", "heads": [[0, 0], "L0H0"]}])  # strength 1 + 1: z' = -z, not 0
    edits("scale_empty", [{"kind": "scale", "heads": [], "strength": 2.0}])
    edits("patch_big_id", [{"kind": "patch", "heads": [[0, 0]], "source": [[10 ** 12, 5]]}])
    edits("mean_negative_id", [{"kind": "mean", "heads": [[0, 0]], "source": [[5, -1]]}])
    edits("var_dims", [{"kind": "var", "heads": [], "options": {"dims": [99999]}}])
    edits("var_layers", [{"kind": "var", "heads": [], "options": {"dims": [1], "layers": [7]}}])
    edits("var_first", [{"kind": "var", "heads": [], "options": {"dims": [1], "first_layer": 9}}])
    HeadScores(torch.rand(4, 8, generator=torch.Generator().manual_seed(0)), "vhd", "vision").to_csv(tmp / "vhd.csv")
    f["vhd_csv"] = str(tmp / "vhd.csv")
    # the icl organism's grid: 4 layers x 4 heads x head_dim 32; alphas far beyond the learned (0, 1)
    TaskEmbedding(torch.randn(4, 4, 32, generator=torch.Generator().manual_seed(0)), {"model": "icl"},
                  torch.full((4, 4), 1e30)).save(tmp / "emb_huge.safetensors")
    f["emb_huge"] = str(tmp / "emb_huge.safetensors")
    first_task = zoo.organism_info("icl")["task_files"][0]
    lines = (zoo.organism_path("icl") / first_task).read_text().splitlines(keepends=True)[:24]
    (tmp / "icl_small.jsonl").write_text("".join(lines))
    f["icl_small"] = str(tmp / "icl_small.jsonl")
    f["bomb"] = png_claiming(tmp / "bomb.png", 100_000, 100_000)  # beyond PIL's own limit: DecompressionBombError
    f["big"] = png_claiming(tmp / "big.png", 9000, 9000)  # 81 M pixels: under PIL's limit, over headscope's
    (tmp / "bombs").mkdir()
    png_claiming(tmp / "bombs" / "a.png", 100_000, 100_000)
    f["bomb_dir"] = str(tmp / "bombs")
    (tmp / "vhd_prompts.txt").write_text("<image>\ndescribe :\n")
    f["vhd_prompts"] = str(tmp / "vhd_prompts.txt")
    return f


def _check(case, files):
    name, argv, fragment, early = case
    got, out, err = run_case([files.get(a[1:-1], a) if a[:1] + a[-1:] == "{}" else a for a in argv], early)  # {file}
    assert got == 2, f"{name}: status {got}\nstdout: {out}\nstderr: {err}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_edits(case, files):
    _check(case, files)


@pytest.mark.skipif(not NO_CUDA, reason="this machine has the device")
@pytest.mark.parametrize("case", NO_GPU_CASES, ids=[c[0] for c in NO_GPU_CASES])
def test_missing_devices(case, files):
    _check(case, files)


# ------------------------------------------------------------------------------ Python API
@pytest.fixture(scope="module")
def hm():
    return HeadModel.load("retrieval")


class _Forwards:
    """Counts the model's forward calls."""

    def __init__(self, model):
        self.n = 0
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.n += 1


def test_empty_heads_is_an_error_omitted_heads_is_not():
    with pytest.raises(HeadscopeError, match="zero edit needs at least one head"):
        Edit("zero", [])
    with pytest.raises(HeadscopeError, match="inject edit needs at least one head"):
        Edit("inject", [], source=torch.zeros(1, 1, 2))
    with pytest.raises(HeadscopeError, match="needs 'kind' and 'heads'"):
        Edit.from_dict({"kind": "zero"})
    # VAR reads no heads as every head: in a file it may leave "heads" out
    assert Edit.from_dict({"kind": "var", "options": {"dims": [1]}}) == Edit("var", [], options={"dims": [1]})


@pytest.mark.parametrize("edit, fragment", [
    (lambda: Edit("patch", [(0, 1)], source=[[5, 10 ** 12]]), "source token id 1000000000000"),
    (lambda: Edit("mean", [(0, 1)], source=[[5, -3]]), "source token id -3"),
])
def test_edits_checked_before_the_first_forward(hm, edit, fragment):
    """Token ids outside the vocabulary: one error naming the edit, before any forward (the reference
    activations of mean / patch included)."""
    forwards = _Forwards(hm.model)
    try:
        with pytest.raises(HeadscopeError) as info:
            with intervene(hm, edit()):
                hm.model(torch.tensor([[5, 6, 7]]))
    finally:
        forwards.handle.remove()
    assert fragment in str(info.value) and forwards.n == 0
    assert not hm.hooks_installed()


def test_var_options_against_the_model_shape():
    from headscope.interventions.kinds.var import VarOptions
    from headscope.interventions.registry import ModelShape  # new with the check: imported here, not at the top

    vision = ModelShape(n_layers=4, n_heads=8, n_kv_heads=4, head_dim=8, d_model=64, vocab_size=100, vision=True)
    VarOptions(dims=[63], layers=[3]).check_against(vision)  # the last dim, the last layer: fine
    for options, fragment in [({"dims": [64]}, "dims: [64] outside this model's hidden dims 0..63"),
                              ({"layers": [4]}, "layers: [4] not within"),
                              ({"layers": []}, "layers: an empty list"),
                              ({"first_layer": 4}, "first_layer 4 is outside")]:
        with pytest.raises(HeadscopeError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
            VarOptions(**options).check_against(vision)


def test_overflowing_edit_stops_the_forward_naming_it(hm):
    """z x 1e30 keeps z finite, but the next RMSNorm squares the residual beyond float32 (inf), so
    every logit of the row is equal (0): an error naming the edit, not a decoded continuation. The
    same edit at 1e5 runs, its logits finite and not constant (no false alarm)."""
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad(), intervene(hm, Edit("scale", [(0, 0), (1, 1)], strength=1e5)):
        logits = hm.model(ids).logits
    assert torch.isfinite(logits).all() and (logits.amax(-1) > logits.amin(-1)).all()
    with pytest.raises(HeadscopeError, match=r"scale on 2 heads \(L0H0, L1H1\), strength 1e\+30"):
        with torch.no_grad(), intervene(hm, Edit("scale", [(0, 0), (1, 1)], strength=1e30)):
            hm.model(ids)
    assert not hm.hooks_installed()
    with pytest.raises(HeadscopeError, match="beyond float32's range"):
        Edit("scale", [(0, 0)], strength=1e300)


def test_device_map_run_leaves_no_offload_folder(monkeypatch, tmp_path):
    """A --device-map run (and one whose split fails) removes the temp offload folder it made."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    got, out, err = run_case([*GEN, "--device-map", '{"": "cpu"}'], early=False)
    assert got == 0, err
    # a split that fails inside from_pretrained (a bad --max-memory size is now refused before loading)
    import headscope.hf.loading as loading

    class Fails:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            raise ValueError("no room for the weights")

    monkeypatch.setattr(loading, "auto_class", lambda config: Fails)
    got, out, err = run_case([*GEN, "--max-memory", "cpu=1GiB"], early=False)
    assert got == 2 and "could not split" in err, err
    assert list(tmp_path.glob("headscope-offload-*")) == []
