"""Hostile-user sweep over the new paths: runs bad CLI invocations on the tiny organisms and tallies
what each one did. Not a pytest module (its name does not match test_*.py); run it as

    nice -n 10 python tests/bad_input_sweep.py [--quick] [--only SUBSTRING] [--verbose]

Every case runs ``headscope.cli.main(argv)`` in a forked child (torch and headscope imported once in
the parent; the child gets its own stdout/stderr files, cwd, environment, umask and rlimits), in a
temp dir, with HF_HUB_OFFLINE=1. Outcomes:

  clear       exit != 0, stderr exactly one ``error: ...`` line, no traceback (and, where the case
              names what the message must mention, it does)
  misleading  exit != 0 but stderr is not one ``error:`` line, or the line misses what it must name
  traceback   a traceback on stderr, or the child died of a signal (bus error, segfault)
  timeout     the child ran past its time limit
  accepted    exit 0: what it printed and wrote is shown so a person can judge it (``ok`` cases are
              valid-but-odd inputs where accepting is the right answer)

Prints one line per case and a summary table by class and outcome; exits 1 if any case gave a
traceback, else 0 (timeouts are listed).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import resource
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from conftest import png_claiming  # noqa: E402  (conftest sets 2 threads; this script uses 1)

torch.set_num_threads(1)

from headscope import zoo  # noqa: E402
from headscope.cli import main as cli_main  # noqa: E402
from headscope.interventions import TaskEmbedding  # noqa: E402
from headscope.scores import HeadScores  # noqa: E402

# warm the lazy imports once in the parent so each forked case starts fast
import transformers.models.llama.modeling_llama  # noqa: E402,F401
import transformers.models.llava.modeling_llava  # noqa: E402,F401

SCENE = str(zoo.organism_path("vision") / "images" / "scene_01.png")
ICL_TASK = str(zoo.organism_path("icl") / "taska.jsonl")
NEEDLE = ["score", "--task", "needle", "--quiet", "--lengths", "64", "--depths", "50"]
NEEDLE_EVAL = ["eval", "--task", "needle", "--quiet", "--lengths", "64", "--depths", "50"]
GEN = ["generate", "--prompt", "The secret", "--max-new-tokens", "1"]
VGEN = ["generate", "--model", "vision", "--prompt", "<image>\ndescribe :", "--max-new-tokens", "1"]
VGEN_I = [*VGEN, "--image", SCENE]
HALL = ["eval", "--task", "hallucination", "--quiet", "--scenes", "1", "--max-new-tokens", "1"]
VHD = ["score", "--task", "vhd", "--quiet"]
ICL_EVAL = ["eval", "--task", "icl", "--quiet", "--queries", "2", "--shots", "1", "--tasks", "{icl_small}"]
FIT = ["inject", "fit", "--model", "icl", "--task", "{icl_small}", "--shots", "1", "--prompts", "2", "--steps", "1",
       "--quiet"]


def make_files(tmp: Path) -> dict[str, str]:
    """The inputs the cases name as {key}."""
    f: dict[str, str] = {"tmp": str(tmp)}

    def put(name: str, content, key: str | None = None) -> str:
        p = tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
        f[key or name.replace(".", "_").replace("/", "_")] = str(p)
        return str(p)

    def edits(name: str, data) -> None:
        put(f"edits/{name}.json", json.dumps(data), f"e_{name}")

    put("empty.txt", "", "empty")
    (tmp / "adir").mkdir()
    f["adir"] = str(tmp / "adir")
    put("locked.json", '[{"kind": "zero", "heads": ["L0H0"]}]', "locked")
    os.chmod(tmp / "locked.json", 0)
    os.symlink(tmp / "loop_b", tmp / "loop_a")
    os.symlink(tmp / "loop_a", tmp / "loop_b")
    f["loop"] = str(tmp / "loop_a")
    put("binary.bin", bytes(range(256)) * 4, "binary")
    put("latin1.txt", "caf\xe9".encode("latin-1"), "latin1")
    needles = Path(__file__).resolve().parent.parent / "datasets" / "needles.jsonl"
    shutil.copy(needles, tmp / "needles.jsonl")
    f["needles"] = str(tmp / "needles.jsonl")
    put("ünïcödé dir/needles.jsonl", needles.read_text(), "uni_needles")
    lines = needles.read_text().splitlines(keepends=True)
    put("needles_other.jsonl", "".join(lines[1:] + lines[:1]), "needles_other")
    put("needles_bad.jsonl", '{"needle": "x", "question": "y"}\n', "needles_bad")
    put("needles_nan.jsonl", '{"needle": NaN, "question": "q", "answer": "1"}\n', "needles_nan")
    icl = Path(ICL_TASK).read_text().splitlines(keepends=True)
    put("icl_small.jsonl", "".join(icl[:24]), "icl_small")
    put("icl_one.jsonl", icl[0], "icl_one")
    put("icl_dup.jsonl", icl[0] * 24, "icl_dup")
    put("icl_bad.jsonl", '{"input": "oaa"}\n' * 24, "icl_bad")
    put("icl_num.jsonl", "".join(json.dumps({"input": i, "output": 2 * i}) + "\n" for i in range(24)), "icl_num")
    # edits files
    edits("zero_empty", [{"kind": "zero", "heads": []}])
    edits("unknown_kind", [{"kind": "explode", "heads": ["L0H0"]}])
    edits("not_list", {"kind": "zero", "heads": ["L0H0"]})
    edits("empty_list", [])
    edits("head_oob", [{"kind": "zero", "heads": ["L99H0"]}])
    edits("head_neg", [{"kind": "zero", "heads": [[-1, 0]]}])
    edits("head_str", [{"kind": "zero", "heads": ["head zero"]}])
    edits("head_float", [{"kind": "zero", "heads": [[0.5, 0]]}])
    edits("head_bool", [{"kind": "zero", "heads": [[True, False]]}])
    edits("scale_nan", [{"kind": "scale", "heads": ["L0H0"], "strength": "NaN"}])
    put("edits/scale_nan_literal.json", '[{"kind": "scale", "heads": ["L0H0"], "strength": NaN}]',
        "e_scale_nan_literal")
    put("edits/scale_inf.json", '[{"kind": "scale", "heads": ["L0H0"], "strength": Infinity}]', "e_scale_inf")
    edits("scale_str", [{"kind": "scale", "heads": ["L0H0"], "strength": "two"}])
    edits("scale_zero", [{"kind": "scale", "heads": ["L0H0"], "strength": 0}])
    edits("scale_neg", [{"kind": "scale", "heads": ["L0H0"], "strength": -1e6}])
    edits("extra_key", [{"kind": "zero", "heads": ["L0H0"], "strenght": 3}])
    edits("patch_big", [{"kind": "patch", "heads": [[0, 0]], "source": [[10 ** 12, 5]]}])
    edits("patch_float", [{"kind": "patch", "heads": [[0, 0]], "source": [[1.5, 2]]}])
    edits("patch_empty_src", [{"kind": "patch", "heads": [[0, 0]], "source": []}])
    edits("mean_neg", [{"kind": "mean", "heads": [[0, 0]], "source": [[5, -1]]}])
    edits("var_dims", [{"kind": "var", "heads": [], "options": {"dims": [99999]}}])
    edits("var_dims_neg", [{"kind": "var", "heads": [], "options": {"dims": [-1]}}])
    edits("var_p_nan", [{"kind": "var", "heads": [], "options": {"p": "nan"}}])
    edits("var_unknown_opt", [{"kind": "var", "heads": [], "options": {"bogus": 1}}])
    edits("var_layers", [{"kind": "var", "heads": [], "options": {"layers": [7]}}])
    edits("vhr_layers", [{"kind": "vhr", "heads": [], "options": {"layers": [99]}}])
    edits("kv_bad", [{"kind": "kv_compress", "heads": [], "options": {"recent": -5}}])
    edits("deep", json.loads("[" * 50 + "]" * 50))
    put("edits/deep_nest.json", "[" * 100000 + "]" * 100000, "e_deep_nest")
    put("edits/dup_keys.json", '[{"kind": "zero", "kind": "scale", "heads": ["L0H0"]}]', "e_dup_keys")
    put("edits/trailing.json", '[{"kind": "zero", "heads": ["L0H0"]}] garbage', "e_trailing")
    put("edits/bom.json", '\ufeff[{"kind": "zero", "heads": ["L0H0"]}]', "e_bom")
    # rankings
    g = torch.Generator().manual_seed(0)
    HeadScores(torch.rand(4, 8, generator=g), "vhd", "vision").to_csv(tmp / "vhd.csv")
    f["vhd_csv"] = str(tmp / "vhd.csv")
    put("nan_rank.csv", "layer,head,score\n" + "".join(f"{l},{h},nan\n" for l in range(4) for h in range(8)),
        "nan_rank")
    put("short_rank.csv", "layer,head,score\n0,0,1.0\n", "short_rank")
    put("neg_rank.csv", "layer,head,score\n-1,0,1.0\n0,0,0.5\n", "neg_rank")
    put("dup_rank.csv", "layer,head,score\n0,0,1.0\n0,0,0.5\n", "dup_rank")
    put("header_only.csv", "layer,head,score\n", "header_only")
    # task embeddings
    TaskEmbedding(torch.randn(4, 4, 32, generator=g), {"model": "icl"}, torch.full((4, 4), 1e30)) \
        .save(tmp / "emb_huge.safetensors")
    f["emb_huge"] = str(tmp / "emb_huge.safetensors")
    TaskEmbedding(torch.full((4, 4, 32), float("nan")), {"model": "icl"}, torch.full((4, 4), 0.5)) \
        .save(tmp / "emb_nan.safetensors")
    f["emb_nan"] = str(tmp / "emb_nan.safetensors")
    TaskEmbedding(torch.randn(4, 4, 32, generator=g), {"model": "icl"}, torch.full((4, 4), float("nan"))) \
        .save(tmp / "emb_nan_alpha.safetensors")
    f["emb_nan_alpha"] = str(tmp / "emb_nan_alpha.safetensors")
    TaskEmbedding(torch.randn(2, 4, 32, generator=g), {"model": "icl"}, torch.full((2, 4), 0.5)) \
        .save(tmp / "emb_shape.safetensors")
    f["emb_shape"] = str(tmp / "emb_shape.safetensors")
    put("emb_trunc.safetensors", (tmp / "emb_huge.safetensors").read_bytes()[:100], "emb_trunc")
    put("emb_garbage.safetensors", b"\xff" * 64, "emb_garbage")
    # images
    png_claiming(tmp / "bomb.png", 100_000, 100_000)
    f["bomb"] = str(tmp / "bomb.png")
    png_claiming(tmp / "wide.png", 2 ** 31 - 1, 1)
    f["wide"] = str(tmp / "wide.png")
    png_claiming(tmp / "zero.png", 0, 0)
    f["zero_png"] = str(tmp / "zero.png")
    put("trunc.png", Path(SCENE).read_bytes()[:60], "trunc_png")
    put("text.png", "this is not an image", "text_png")
    put("scene.gif", Path(SCENE).read_bytes(), "scene_gif")
    (tmp / "imgs").mkdir()
    shutil.copy(SCENE, tmp / "imgs" / "a.png")
    f["imgs"] = str(tmp / "imgs")
    (tmp / "imgs_empty").mkdir()
    f["imgs_empty"] = str(tmp / "imgs_empty")
    (tmp / "imgs_bomb").mkdir()
    png_claiming(tmp / "imgs_bomb" / "a.png", 100_000, 100_000)
    f["imgs_bomb"] = str(tmp / "imgs_bomb")
    put("vhd_prompts.txt", "<image>\ndescribe :\n", "vhd_prompts")
    put("vhd_noimg.txt", "describe :\n", "vhd_noimg")
    put("vhd_two.txt", "<image> <image>\ndescribe :\n", "vhd_two")
    put("vhd_missing.jsonl", '{"image": "nope.png", "prompt": "<image>\\ndescribe :"}\n', "vhd_missing")
    put("vhd_escape.jsonl", '{"image": "../../../etc/passwd", "prompt": "<image> x"}\n', "vhd_escape")
    # device maps
    put("devmap.json", '{"": "cpu"}', "devmap_file")
    return f


def case(cls, name, argv, expect=None, env=None, ok=False, pre=None, umask=None, fsize=None, nobody=False,
         timeout=None):
    """One invocation. ``ok``: accepting it is right (a str says why: a judged residual, printed);
    ``expect``: what its error line must mention to count as clear."""
    return dict(cls=cls, name=name, argv=argv, expect=expect, env=env or {}, ok=ok, pre=pre, umask=umask,
                fsize=fsize, nobody=nobody, timeout=timeout)


def cases() -> list[dict]:
    C = []
    # ---------------- setup: valid runs that make the fixtures later cases use (must be accepted)
    C += [
        case("setup", "needle-ranking", [*NEEDLE, "--out", "r.csv"], ok=True),
        case("setup", "shard-0of2", [*NEEDLE, "--depths", "0,50,100", "--shard", "0/2", "--out", "parts/a.0"], ok=True),
        case("setup", "shard-1of2", [*NEEDLE, "--depths", "0,50,100", "--shard", "1/2", "--out", "parts/a.1"], ok=True),
        case("setup", "shard-1of2-bs2", [*NEEDLE, "--depths", "0,50,100", "--shard", "1/2", "--batch-size", "2",
                                         "--out", "parts/b.1"], ok=True),
        case("setup", "shard-1of2-len", ["score", "--task", "needle", "--quiet", "--lengths", "96",
                                         "--depths", "0,50,100", "--shard", "1/2", "--out", "parts/c.1"], ok=True),
        case("setup", "shard-1of2-needles", [*NEEDLE, "--depths", "0,50,100", "--needles", "{needles_other}",
                                             "--shard", "1/2", "--out", "parts/d.1"], ok=True),
        case("setup", "shard-0of3", [*NEEDLE, "--depths", "0,50,100", "--shard", "0/3", "--out", "parts/e.0"],
             ok=True),
        case("setup", "inject-fit", [*FIT, "--out", "emb.safetensors"], ok=True),
    ]
    # ---------------- sharding + merge
    C += [
        case("shard", "merge-batch-size", ["merge", "parts/a.0", "parts/b.1", "--out", "m1.csv"], "batch"),
        case("shard", "merge-lengths", ["merge", "parts/a.0", "parts/c.1", "--out", "m2.csv"], "length"),
        case("shard", "merge-needles", ["merge", "parts/a.0", "parts/d.1", "--out", "m3.csv"], "needles"),
        case("shard", "merge-other-n", ["merge", "parts/a.0", "parts/e.0", "--out", "m4.csv"]),
        case("shard", "merge-duplicate", ["merge", "parts/a.0", "parts/a.0", "--out", "m5.csv"]),
        case("shard", "merge-gap", ["merge", "parts/a.0", "--out", "m6.csv"], "missing"),
        case("shard", "merge-none", ["merge", "--out", "m7.csv"]),
        case("shard", "merge-out-is-part", ["merge", "parts/a.0", "parts/a.1", "--out", "parts/a.0"]),
        case("shard", "merge-ranking-as-part", ["merge", "r.csv", "parts/a.1", "--out", "m8.csv"]),
        case("shard", "merge-empty-file", ["merge", "{empty}", "parts/a.1", "--out", "m9.csv"]),
        case("shard", "merge-dir", ["merge", "{adir}", "parts/a.1", "--out", "m10.csv"]),
        case("shard", "merge-loop", ["merge", "{loop}", "parts/a.1", "--out", "m11.csv"]),
        case("shard", "merge-binary", ["merge", "{binary}", "parts/a.1", "--out", "m12.csv"]),
        case("shard", "merge-same-via-dotdot", ["merge", "parts/a.0", "parts/../parts/a.0", "--out", "m13.csv"]),
        case("shard", "merge-ok", ["merge", "parts/a.0", "parts/a.1", "--out", "merged.csv"], ok=True),
        case("shard", "merge-ok-reversed", ["merge", "parts/a.1", "parts/a.0", "--out", "merged2.csv"], ok=True),
        case("shard", "merge-out-no-csv", ["merge", "parts/a.0", "parts/a.1", "--out", "merged.txt"]),
        case("shard", "shard-2of2", [*NEEDLE, "--shard", "2/2", "--out", "x.part"]),
        case("shard", "shard-neg", [*NEEDLE, "--shard=-1/2", "--out", "x.part"]),
        case("shard", "shard-zero-n", [*NEEDLE, "--shard", "0/0", "--out", "x.part"]),
        case("shard", "shard-huge-n", [*NEEDLE, "--shard", "0/99999999999999999999", "--out", "x.part"],
             ok='a legal N; the part is correct, merge then asks for the other shards'),
        case("shard", "shard-more-than-trials", [*NEEDLE, "--shard", "5/10", "--out", "x5.part"],
             ok='an empty shard merges like any other'),
        case("shard", "shard-text", [*NEEDLE, "--shard", "a/b", "--out", "x.part"]),
        case("shard", "shard-unicode-digits", [*NEEDLE, "--shard", "\u0661/\u0662", "--out", "x.part"],
             ok='int() reads Arabic-Indic digits; it ran part 1/2 and says so'),
        case("shard", "shard-no-out", [*NEEDLE, "--shard", "0/2"]),
        case("shard", "shard-task-cannot", ["score", "--task", "sinks", "--quiet", "--shard", "0/2", "--out", "s.p"]),
        case("shard", "shard-twice", [*NEEDLE, "--shard", "0/2", "--shard", "1/2", "--out", "x2.part"],
             ok='argparse: the last of a repeated option wins, and the part names 1/2'),
        case("shard", "needles-unicode-path", [*NEEDLE, "--needles", "{uni_needles}", "--shard", "0/2",
                                               "--out", "ü.part"], ok=True),
        case("shard", "shard-out-is-needles", [*NEEDLE, "--needles", "{needles}", "--shard", "0/2",
                                               "--out", "{needles}"]),
        case("shard", "merge-part-chmod000", ["merge", "{locked}", "parts/a.1", "--out", "m14.csv"],
             nobody=True),
    ]
    # ---------------- vision
    C += [
        case("vision", "bomb-image", [*VGEN, "--image", "{bomb}"], "bomb"),
        case("vision", "wide-image", [*VGEN, "--image", "{wide}"]),
        case("vision", "zero-size-image", [*VGEN, "--image", "{zero_png}"]),
        case("vision", "truncated-png", [*VGEN, "--image", "{trunc_png}"]),
        case("vision", "text-as-png", [*VGEN, "--image", "{text_png}"]),
        case("vision", "png-named-gif", [*VGEN, "--image", "{scene_gif}"], ok=True),
        case("vision", "image-dir", [*VGEN, "--image", "{adir}"]),
        case("vision", "image-missing", [*VGEN, "--image", "nope.png"]),
        case("vision", "image-loop", [*VGEN, "--image", "{loop}"]),
        case("vision", "image-empty", [*VGEN, "--image", "{empty}"]),
        case("vision", "image-chmod000", [*VGEN, "--image", "{locked}"], nobody=True),
        case("vision", "no-image", VGEN, "--image"),
        case("vision", "image-no-placeholder", ["generate", "--model", "vision", "--prompt", "describe :",
                                                "--image", SCENE, "--max-new-tokens", "1"]),
        case("vision", "two-placeholders", ["generate", "--model", "vision", "--prompt", "<image> <image> describe :",
                                            "--image", SCENE, "--max-new-tokens", "1"]),
        case("vision", "image-on-text-model", [*GEN, "--image", SCENE]),
        case("vision", "vhd-bomb-dir", [*VHD, "--images", "{imgs_bomb}", "--prompts", "{vhd_prompts}"], "bomb"),
        case("vision", "vhd-empty-dir", [*VHD, "--images", "{imgs_empty}", "--prompts", "{vhd_prompts}"]),
        case("vision", "vhd-images-file", [*VHD, "--images", SCENE, "--prompts", "{vhd_prompts}"]),
        case("vision", "vhd-prompt-no-image", [*VHD, "--images", "{imgs}", "--prompts", "{vhd_noimg}"]),
        case("vision", "vhd-prompt-two-images", [*VHD, "--images", "{imgs}", "--prompts", "{vhd_two}"]),
        case("vision", "vhd-prompts-missing-image", [*VHD, "--images", "{imgs}", "--prompts", "{vhd_missing}"]),
        case("vision", "vhd-prompts-escape", [*VHD, "--images", "{imgs}", "--prompts", "{vhd_escape}"]),
        case("vision", "vhd-prompts-empty", [*VHD, "--images", "{imgs}", "--prompts", "{empty}"]),
        case("vision", "vhd-layers-7", [*VHD, "--images", "{imgs}", "--prompts", "{vhd_prompts}", "--layers", "7"]),
        case("vision", "vhd-layers-neg", [*VHD, "--images", "{imgs}", "--prompts", "{vhd_prompts}", "--layers", "-1"]),
        case("vision", "vhd-layers-empty", [*VHD, "--images", "{imgs}", "--prompts", "{vhd_prompts}", "--layers", ""]),
        case("vision", "vhd-on-text-model", [*VHD, "--model", "retrieval", "--images", "{imgs}",
                                             "--prompts", "{vhd_prompts}"]),
        case("vision", "qprompt-other-field", [*HALL, "--question-prompt", "<image> is there a {obj} ?"], "{object}"),
        case("vision", "qprompt-empty-field", [*HALL, "--question-prompt", "<image> {} {object} ?"], "{object}"),
        case("vision", "qprompt-attr", [*HALL, "--question-prompt", "<image> {object.__class__} ?"], "{object}"),
        case("vision", "qprompt-index", [*HALL, "--question-prompt", "<image> {object[0]} ?"], "{object}"),
        case("vision", "qprompt-unbalanced", [*HALL, "--question-prompt", "<image> {object ?"]),
        case("vision", "qprompt-no-field", [*HALL, "--question-prompt", "<image> is there a cat ?"]),
        case("vision", "qprompt-no-image", [*HALL, "--question-prompt", "is there a {object} ?"]),
        case("vision", "cprompt-field", [*HALL, "--caption-prompt", "<image> {object}"],
             ok='the caption prompt has no fields: braces are literal text'),
        case("vision", "cprompt-no-image", [*HALL, "--caption-prompt", "describe :"]),
        case("vision", "scenes-zero", [*HALL[:-4], "--scenes", "0", "--max-new-tokens", "1"]),
        case("vision", "scenes-neg", [*HALL[:-4], "--scenes", "-3", "--max-new-tokens", "1"]),
        case("vision", "scenes-huge", [*HALL[:-4], "--scenes", "10000000", "--max-new-tokens", "1"],
             ok="a long run, as asked",
             timeout=20),
        case("vision", "hall-max-new-zero", [*HALL[:-2], "--max-new-tokens", "0"]),
        case("vision", "var-on-text-model", [*GEN, "--var"]),
        case("vision", "var-p-nan", [*VGEN_I, "--var", "--var-p", "nan"]),
        case("vision", "var-p-neg", [*VGEN_I, "--var", "--var-p", "-1"]),
        case("vision", "var-p-huge", [*VGEN_I, "--var", "--var-p", "1e30"]),
        case("vision", "var-rho-2", [*VGEN_I, "--var", "--var-rho", "2"]),
        case("vision", "var-tau-neg", [*VGEN_I, "--var", "--var-tau", "-5"],
             ok="tau below every phi marks every image token a sink (the API's tests use it); warns"),
        case("vision", "var-p-without-var", [*VGEN_I, "--var-p", "0.3"]),
        case("vision", "vhr-per-input-text-model", [*GEN, "--vhr", "per-input"]),
        case("vision", "vhr-layers-7", [*VGEN_I, "--vhr", "per-input", "--vhr-layers", "7"]),
        case("vision", "vhr-csv-layers-neg", [*VGEN_I, "--vhr", "{vhd_csv}", "--vhr-layers", "-1"]),
        case("vision", "vhr-layers-text", [*VGEN_I, "--vhr", "per-input", "--vhr-layers", "a,b"]),
        case("vision", "vhr-layers-without-vhr", [*VGEN_I, "--vhr-layers", "1"]),
        case("vision", "vhr-ranking-other-task", [*VGEN_I, "--vhr", "r.csv"]),
        case("vision", "vhr-csv-missing", [*VGEN_I, "--vhr", "nope.csv"]),
    ]
    # ---------------- soft injection / inject fit
    C += [
        case("inject", "fit-out-collides-scores-sidecar", [*FIT, "--out", "emb2.json", "--scores", "emb2.csv"]),
        case("inject", "fit-out-is-task", [*FIT, "--out", "{icl_small}"]),
        case("inject", "fit-out-not-safetensors", [*FIT, "--out", "emb.txt"],
             ok='embeddings are read by content (safetensors header), any name'),
        case("inject", "fit-out-dir", [*FIT, "--out", "{adir}"]),
        case("inject", "fit-out-empty", [*FIT, "--out", ""]),
        case("inject", "fit-out-missing-dir", [*FIT, "--out", "no/such/dir/emb.safetensors"],
             ok='missing folders are created, as for every output'),
        case("inject", "fit-full-disk", [*FIT, "--out", "fsz.safetensors"], fsize=1000),
        case("inject", "fit-shots-zero", [*FIT, "--shots", "0", "--out", "e0.safetensors"]),
        case("inject", "fit-shots-huge", [*FIT, "--shots", "100000", "--out", "e1.safetensors"]),
        case("inject", "fit-prompts-zero", [*FIT, "--prompts", "0", "--out", "e2.safetensors"]),
        case("inject", "fit-steps-zero", [*FIT, "--steps", "0", "--out", "e3.safetensors"]),
        case("inject", "fit-steps-neg", [*FIT, "--steps", "-1", "--out", "e4.safetensors"]),
        case("inject", "fit-lr-nan", [*FIT, "--lr", "nan", "--out", "e5.safetensors"]),
        case("inject", "fit-lr-1e30", [*FIT, "--lr", "1e30", "--out", "e23.safetensors"],
             ok="alphas are squashed into (0, 1): a poor fit, honestly reported"),
        case("inject", "fit-lr-zero", [*FIT, "--lr", "0", "--out", "e6.safetensors"]),
        case("inject", "fit-lr-huge", [*FIT, "--lr", "1e300", "--out", "e7.safetensors"]),
        case("inject", "fit-task-empty", [*FIT[:4], "--task", "{empty}", *FIT[6:], "--out", "e8.safetensors"]),
        case("inject", "fit-task-one-line", [*FIT[:4], "--task", "{icl_one}", *FIT[6:], "--out", "e9.safetensors"]),
        case("inject", "fit-task-no-output", [*FIT[:4], "--task", "{icl_bad}", *FIT[6:], "--out", "e10.safetensors"]),
        case("inject", "fit-task-numbers", [*FIT[:4], "--task", "{icl_num}", *FIT[6:], "--out", "e11.safetensors"],
             ok='numbers are read as their text'),
        case("inject", "fit-task-dir", [*FIT[:4], "--task", "{adir}", *FIT[6:], "--out", "e12.safetensors"]),
        case("inject", "fit-task-loop", [*FIT[:4], "--task", "{loop}", *FIT[6:], "--out", "e13.safetensors"]),
        case("inject", "fit-task-latin1", [*FIT[:4], "--task", "{latin1}", *FIT[6:], "--out", "e14.safetensors"]),
        case("inject", "fit-template-no-y", [*FIT, "--template", "Q: {x}", "--out", "e15.safetensors"]),
        case("inject", "fit-template-other-field", [*FIT, "--template", "Q: {z} A: {y}", "--out", "e16.safetensors"]),
        case("inject", "fit-template-attr", [*FIT, "--template", "{x.__class__} {y}", "--out", "e17.safetensors"]),
        case("inject", "fit-template-empty-field", [*FIT, "--template", "{} {y}", "--out", "e18.safetensors"]),
        case("inject", "fit-scores-no-csv", [*FIT, "--out", "e19.safetensors", "--scores", "s.txt"]),
        case("inject", "fit-scores-equals-out", [*FIT, "--out", "e20.safetensors", "--scores", "e20.safetensors"]),
        case("inject", "fit-on-vision-model", [*FIT[:2], "--model", "vision", *FIT[4:], "--out", "e21.safetensors"]),
        case("inject", "fit-umask-000", [*FIT, "--out", "e22.safetensors"], umask=0, ok=True),
        case("inject", "eval-inject-huge-alphas", [*ICL_EVAL, "--inject", "{emb_huge}"]),
        case("inject", "eval-inject-nan-embedding", [*ICL_EVAL, "--inject", "{emb_nan}"]),
        case("inject", "eval-inject-nan-alphas", [*ICL_EVAL, "--inject", "{emb_nan_alpha}"]),
        case("inject", "eval-inject-wrong-shape", [*ICL_EVAL, "--inject", "{emb_shape}"]),
        case("inject", "eval-inject-truncated", [*ICL_EVAL, "--inject", "{emb_trunc}"]),
        case("inject", "eval-inject-garbage", [*ICL_EVAL, "--inject", "{emb_garbage}"]),
        case("inject", "eval-inject-empty", [*ICL_EVAL, "--inject", "{empty}"]),
        case("inject", "eval-inject-dir", [*ICL_EVAL, "--inject", "{adir}"]),
        case("inject", "eval-inject-csv", [*ICL_EVAL, "--inject", "r.csv"]),
        case("inject", "eval-inject-other-model", [*NEEDLE_EVAL, "--inject", "emb.safetensors"], "model"),
        case("inject", "gen-inject-other-model", [*GEN, "--inject", "emb.safetensors"], "model"),
        case("inject", "gen-inject-ok", ["generate", "--model", "icl", "--prompt", "Q: oaa\nA:", "--max-new-tokens",
                                         "1", "--inject", "emb.safetensors"], ok=True),
        case("inject", "eval-inject-chmod000", [*ICL_EVAL, "--inject", "{locked}"], nobody=True),
        case("inject", "icl-shots-neg", [*ICL_EVAL, "--shots", "-1"]),
        case("inject", "icl-queries-zero", [*ICL_EVAL, "--queries", "0"]),
        case("inject", "icl-tasks-dup-inputs", ["eval", "--task", "icl", "--quiet", "--queries", "2", "--shots", "1",
                                                "--tasks", "{icl_dup}"]),
        case("inject", "icl-tasks-twice", [*ICL_EVAL, "--tasks", "{icl_small}", "{icl_small}"],
             ok='the task is evaluated twice, printed twice'),
    ]
    # ---------------- device maps / --max-memory
    C += [
        case("device", "map-cuda", [*GEN, "--device-map", '{"": "cuda:0"}']),
        case("device", "map-tpu", [*GEN, "--device-map", '{"": "tpu"}']),
        case("device", "map-int", [*GEN, "--device-map", '{"": 7}']),
        case("device", "map-neg-int", [*GEN, "--device-map", '{"": -1}']),
        case("device", "map-cpu", [*GEN, "--device-map", '{"": "cpu"}'], ok=True),
        case("device", "map-disk", [*GEN, "--device-map", '{"": "disk"}'],
             ok='the whole model offloaded to disk, as asked (transformers warns)'),
        case("device", "map-unknown-module", [*GEN, "--device-map", '{"model.nope": "cpu"}']),
        case("device", "map-typo-module", [*GEN, "--device-map", '{"model.layrs.0": "cpu"}'], "model.layrs.0"),
        case("device", "map-partial", [*GEN, "--device-map", '{"model.layers.0": "cpu"}'],
             ok='modules left out of the map stay on the CPU'),
        case("device", "map-bad-json", [*GEN, "--device-map", '{"": cpu']),
        case("device", "map-list", [*GEN, "--device-map", '["cpu"]']),
        case("device", "map-empty", [*GEN, "--device-map", ""]),
        case("device", "map-empty-obj", [*GEN, "--device-map", "{}"], ok='an empty map loads on the CPU'),
        case("device", "map-word", [*GEN, "--device-map", "everywhere"]),
        case("device", "map-file-path", [*GEN, "--device-map", "{devmap_file}"]),
        case("device", "map-auto", [*GEN, "--device-map", "auto"], ok=True),
        case("device", "map-with-device", [*GEN, "--device-map", "auto", "--device", "cpu"]),
        case("device", "max-memory-gpu", [*GEN, "--device-map", "auto", "--max-memory", "0=20GiB"]),
        case("device", "max-memory-no-map", [*GEN, "--max-memory", "cpu=1GiB"],
             ok='--max-memory alone implies --device-map auto (documented)'),
        case("device", "max-memory-zero", [*GEN, "--device-map", "auto", "--max-memory", "cpu=0GiB"],
             ok='a zero CPU budget offloads to disk, as asked'),
        case("device", "max-memory-neg", [*GEN, "--device-map", "auto", "--max-memory", "cpu=-5GiB"]),
        case("device", "max-memory-nan", [*GEN, "--device-map", "auto", "--max-memory", "cpu=nanGiB"]),
        case("device", "max-memory-huge", [*GEN, "--device-map", "auto", "--max-memory", "cpu=1e300GiB"]),
        case("device", "max-memory-garbage", [*GEN, "--device-map", "auto", "--max-memory", "lots"]),
        case("device", "max-memory-unit", [*GEN, "--device-map", "auto", "--max-memory", "cpu=20Parsecs"]),
        case("device", "max-memory-dup", [*GEN, "--device-map", "auto", "--max-memory", "cpu=1GiB,cpu=2GiB"]),
        case("device", "max-memory-tiny", [*GEN, "--device-map", "auto", "--max-memory", "cpu=1KiB"],
             ok='offloaded to disk, as asked'),
        case("device", "device-cuda", [*GEN, "--device", "cuda"]),
        case("device", "device-cuda-7", [*GEN, "--device", "cuda:7"]),
        case("device", "device-garbage", [*GEN, "--device", "toaster"]),
        case("device", "device-mps", [*GEN, "--device", "mps"]),
        case("device", "device-meta", [*GEN, "--device", "meta"]),
        case("device", "device-empty", [*GEN, "--device", ""]),
        case("device", "export-device-cuda", ["export", "r.csv", "--format", "qrhead", "--out", "q.yaml",
                                              "--device", "cuda"]),
        case("device", "dtype-garbage", [*GEN, "--dtype", "float8"]),
        case("device", "dtype-int", [*GEN, "--dtype", "int64"]),
        case("device", "fit-device-map-tpu", [*FIT, "--device-map", '{"": "tpu"}', "--out", "e30.safetensors"]),
        case("device", "score-max-memory-gpu", [*NEEDLE, "--device-map", "auto", "--max-memory", "3=1GiB"]),
        case("device", "offload-left-behind", [*GEN, "--device-map", "auto"], ok=True,
             pre="offload"),
    ]
    # ---------------- --edits files
    E = lambda key: [*GEN, "--edits", "{%s}" % key]  # noqa: E731
    C += [
        case("edits", "zero-empty-heads", E("e_zero_empty"), "at least one head"),
        case("edits", "unknown-kind", E("e_unknown_kind")),
        case("edits", "not-a-list", E("e_not_list"), ok='one edit object is read as a list of one'),
        case("edits", "empty-list", E("e_empty_list")),
        case("edits", "head-out-of-range", E("e_head_oob")),
        case("edits", "head-negative", E("e_head_neg")),
        case("edits", "head-string", E("e_head_str")),
        case("edits", "head-float", E("e_head_float")),
        case("edits", "head-bool", E("e_head_bool")),
        case("edits", "strength-nan-string", E("e_scale_nan")),
        case("edits", "strength-nan-literal", E("e_scale_nan_literal")),
        case("edits", "strength-inf-literal", E("e_scale_inf")),
        case("edits", "strength-string", E("e_scale_str")),
        case("edits", "strength-zero", E("e_scale_zero"), ok=True),
        case("edits", "strength-neg-huge", E("e_scale_neg"), ok='a finite strength within float32, as asked'),
        case("edits", "misspelt-key", E("e_extra_key")),
        case("edits", "patch-token-1e12", E("e_patch_big")),
        case("edits", "patch-token-float", E("e_patch_float")),
        case("edits", "patch-empty-source", E("e_patch_empty_src")),
        case("edits", "mean-token-neg", E("e_mean_neg")),
        case("edits", "var-dims-99999", [*VGEN_I, "--edits", "{e_var_dims}"]),
        case("edits", "var-dims-neg", [*VGEN_I, "--edits", "{e_var_dims_neg}"]),
        case("edits", "var-p-nan", [*VGEN_I, "--edits", "{e_var_p_nan}"]),
        case("edits", "var-unknown-option", [*VGEN_I, "--edits", "{e_var_unknown_opt}"]),
        case("edits", "var-layers-7", [*VGEN_I, "--edits", "{e_var_layers}"]),
        case("edits", "vhr-layers-99", [*VGEN_I, "--edits", "{e_vhr_layers}"]),
        case("edits", "var-on-text-model", E("e_var_dims")),
        case("edits", "kv-recent-neg", E("e_kv_bad")),
        case("edits", "nested-lists", E("e_deep")),
        case("edits", "deep-nesting", E("e_deep_nest")),
        case("edits", "duplicate-keys", E("e_dup_keys")),
        case("edits", "trailing-garbage", E("e_trailing")),
        case("edits", "utf8-bom", E("e_bom")),
        case("edits", "empty-file", E("empty")),
        case("edits", "directory", E("adir")),
        case("edits", "symlink-loop", E("loop")),
        case("edits", "binary", E("binary")),
        case("edits", "chmod000", E("locked"), nobody=True),
        case("edits", "ranking-csv-as-edits", [*GEN, "--edits", "r.csv"]),
        case("edits", "edits-twice", [*E("e_zero_empty"), "--edits", "{e_head_oob}"]),
        case("edits", "edits-plus-ablate", [*E("e_head_oob"), "--ablate", "--heads", "L0H0"]),
        case("edits", "eval-edits-oob", [*NEEDLE_EVAL, "--edits", "{e_head_oob}"]),
        case("edits", "alpha-1e300", [*GEN, "--scale", "--heads", "L0H0", "--alpha", "1e300"]),
        case("edits", "alpha-1e30", [*GEN, "--scale", "--heads", "L0H0,L1H1", "--alpha", "1e30"]),
        case("edits", "alpha-neg-1e30", [*GEN, "--scale", "--heads", "L0H0,L1H1", "--alpha=-1e30"]),
        case("edits", "alpha-nan", [*GEN, "--scale", "--heads", "L0H0", "--alpha", "nan"]),
        case("edits", "alpha-without-scale", [*GEN, "--alpha", "3"]),
        case("edits", "heads-empty", [*GEN, "--ablate", "--heads", ""]),
        case("edits", "heads-oob", [*GEN, "--ablate", "--heads", "L9H9"]),
        case("edits", "heads-dup", [*GEN, "--ablate", "--heads", "L0H0,L0H0"],
             ok='--heads L0H0,L0H0 is one head (a set); ablating it once is what was asked'),
        case("edits", "heads-unicode", [*GEN, "--ablate", "--heads", "L\u0660H0"], ok='int() reads the digit'),
        case("edits", "top-zero", [*GEN, "--ablate", "r.csv", "--top", "0"]),
        case("edits", "top-huge", [*GEN, "--ablate", "r.csv", "--top", "1000000"]),
        case("edits", "ablate-nan-ranking", [*GEN, "--ablate", "{nan_rank}", "--top", "2"]),
        case("edits", "ablate-short-ranking", [*GEN, "--ablate", "{short_rank}", "--top", "2"]),
        case("edits", "ablate-neg-ranking", [*GEN, "--ablate", "{neg_rank}", "--top", "2"]),
        case("edits", "ablate-dup-ranking", [*GEN, "--ablate", "{dup_rank}", "--top", "2"]),
        case("edits", "ablate-header-only", [*GEN, "--ablate", "{header_only}", "--top", "2"]),
        case("edits", "ablate-other-model", ["eval", "--task", "refusal", "--quiet", "--limit", "2",
                                             "--ablate", "r.csv", "--top", "2"], "model"),
        case("edits", "decore-alpha-nan", [*GEN, "--decore", "r.csv", "--top", "2", "--decore-alpha", "nan"]),
        case("edits", "decore-alpha-huge", [*GEN, "--decore", "r.csv", "--top", "2", "--decore-alpha", "1e30"],
             ok='finite logits, as asked'),
        case("edits", "random-zero", [*NEEDLE_EVAL, "--random", "0"]),
        case("edits", "random-huge", [*NEEDLE_EVAL, "--random", "1000"]),
        case("edits", "draws-zero", [*NEEDLE_EVAL, "--random", "2", "--draws", "0"]),
    ]
    # ---------------- the compiled CPU tile kernel cache
    K = ["score", "--task", "sinks", "--quiet", "--max-tokens", "16"]
    C += [
        case("kernel", "kernel-env-garbage", K, "HEADSCOPE_CPU_KERNEL", env={"HEADSCOPE_CPU_KERNEL": "maybe"}),
        case("kernel", "kernel-env-off", K, env={"HEADSCOPE_CPU_KERNEL": "OFF"}, ok=True),
        case("kernel", "kernel-env-unicode", K, env={"HEADSCOPE_CPU_KERNEL": "\u00f6ff"}),
        case("kernel", "cache-is-file", K, env={"HEADSCOPE_CACHE": "{empty}"}, ok=True),
        case("kernel", "cache-world-writable", K, env={"HEADSCOPE_CACHE": "{tmp}/wcache"}, pre="world_cache",
             ok=True),
        case("kernel", "cache-planted-lib", K, env={"HEADSCOPE_CACHE": "{tmp}/pcache"}, pre="plant", ok=True),
        case("kernel", "cache-truncated-lib", K, env={"HEADSCOPE_CACHE": "{tmp}/tcache"}, pre="truncate", ok=True),
        case("kernel", "cache-umask-000", K, env={"HEADSCOPE_CACHE": "{tmp}/ucache"}, umask=0, ok=True,
             pre="check_umask"),
        case("kernel", "cache-xdg", K, env={"XDG_CACHE_HOME": "{tmp}/xdg"}, ok=True, pre="check_xdg"),
        case("kernel", "cache-unwritable", K, env={"HEADSCOPE_CACHE": "/proc/headscope"}, ok=True),
        case("kernel", "cache-loop", K, env={"HEADSCOPE_CACHE": "{loop}"}, ok=True),
        case("kernel", "cxx-garbage", K, env={"CXX": "/bin/false", "HEADSCOPE_CACHE": "{tmp}/ccache"}, ok=True),
        case("kernel", "max-tokens-zero", [*K[:-1], "0"]),
        case("kernel", "max-tokens-neg", [*K[:-1], "-4"]),
        case("kernel", "eps-nan", [*K, "--eps", "nan"]),
        case("kernel", "eps-neg", [*K, "--eps", "-1"]),
        case("kernel", "text-empty", [*K, "--text", "{empty}"]),
        case("kernel", "text-binary", [*K, "--text", "{binary}"]),
    ]
    # ---------------- export / formats
    X = ["export", "r.csv"]
    C += [
        case("export", "format-missing", [*X, "--out", "q.yaml"]),
        case("export", "qrhead-ok", [*X, "--format", "qrhead", "--out", "q.yaml"], ok=True),
        case("export", "qrhead-top-zero", [*X, "--format", "qrhead", "--out", "q0.yaml", "--top", "0"]),
        case("export", "qrhead-top-huge", [*X, "--format", "qrhead", "--out", "q1.yaml", "--top", "100000"]),
        case("export", "qrhead-top-neg", [*X, "--format", "qrhead", "--out", "q2.yaml", "--top", "-1"]),
        case("export", "duo-full-share-2", [*X, "--format", "duo", "--out", "duo1", "--full-share", "2"]),
        case("export", "duo-full-share-nan", [*X, "--format", "duo", "--out", "duo2", "--full-share", "nan"]),
        case("export", "duo-full-share-neg", [*X, "--format", "duo", "--out", "duo3", "--full-share", "-0.5"]),
        case("export", "duo-sink-neg", [*X, "--format", "duo", "--out", "duo4", "--sink", "-1"]),
        case("export", "duo-recent-zero", [*X, "--format", "duo", "--out", "duo5", "--recent", "0"]),
        case("export", "duo-out-is-file", [*X, "--format", "duo", "--out", "{empty}"]),
        case("export", "out-is-input", [*X, "--format", "qrhead", "--out", "r.csv"]),
        case("export", "out-is-sidecar", [*X, "--format", "qrhead", "--out", "r.json"]),
        case("export", "out-is-dir", [*X, "--format", "retrieval-head", "--out", "{adir}"]),
        case("export", "out-empty", [*X, "--format", "retrieval-head", "--out", ""]),
        case("export", "out-wrong-ext", [*X, "--format", "retrieval-head", "--out", "rh.yaml"]),
        case("export", "out-long-name", [*X, "--format", "qrhead", "--out", "a" * 254 + ".yaml"]),
        case("export", "ranking-nan", ["export", "{nan_rank}", "--format", "qrhead", "--out", "q3.yaml"]),
        case("export", "ranking-header-only", ["export", "{header_only}", "--format", "qrhead", "--out", "q4.yaml"]),
        case("export", "ranking-part", ["export", "parts/a.0", "--format", "qrhead", "--out", "q5.yaml"]),
        case("export", "ranking-empty", ["export", "{empty}", "--format", "qrhead", "--out", "q6.yaml"]),
        case("export", "ranking-dir", ["export", "{adir}", "--format", "qrhead", "--out", "q7.yaml"]),
        case("export", "model-other", [*X, "--format", "qrhead", "--out", "q8.yaml", "--model", "icl"], "model"),
        case("export", "model-missing", [*X, "--format", "qrhead", "--out", "q9.yaml", "--model", "no/such-model"]),
        case("export", "kv-rule-mean-on-qrhead", [*X, "--format", "qrhead", "--out", "q10.yaml", "--kv-rule", "max"]),
        case("export", "reimport-qrhead-kv", [*NEEDLE_EVAL, "--kv-compress", "q.yaml"], ok=True),
        case("export", "overlap-self", ["overlap", "r.csv", "r.csv"], ok=True),
        case("export", "overlap-other-model-force", ["overlap", "r.csv", "{vhd_csv}", "--force"], ok=True),
        case("export", "overlap-nan", ["overlap", "r.csv", "{nan_rank}"]),
        case("export", "overlap-other-model", ["overlap", "r.csv", "{vhd_csv}"]),
        case("export", "score-out-tsv", [*NEEDLE, "--out", "r.tsv"]),
        case("export", "score-out-254", [*NEEDLE, "--out", "b" * 251 + ".csv"]),
        case("export", "score-out-empty", [*NEEDLE, "--out", ""]),
        case("export", "score-out-sidecar-of-r", [*NEEDLE, "--out", "r.json"]),
        case("export", "score-out-unicode", [*NEEDLE, "--out", "ränküng ✓.csv"], ok=True),
        case("export", "score-out-dup-flag", [*NEEDLE, "--out", "o1.csv", "--out", "o2.csv"], ok=True),
        case("export", "score-out-full-disk", [*NEEDLE, "--out", "fd.csv"], fsize=100),
    ]
    # ---------------- kv-compress
    KVGEN = ["generate", "--prompt", "The secret " * 10, "--max-new-tokens", "1", "--sink", "2", "--recent", "4",
             "--kv-compress"]
    KV = ["eval", "--task", "needle", "--quiet", "--lengths", "128", "--depths", "50", "--sink", "2", "--recent", "8",
          "--kv-compress"]
    C += [
        case("kv", "full-share-nan", [*KV, "r.csv", "--full-share", "nan"]),
        case("kv", "full-share-2", [*KV, "r.csv", "--full-share", "2"]),
        case("kv", "full-share-neg", [*KV, "r.csv", "--full-share", "-0.1"]),
        case("kv", "full-share-zero", [*KV, "r.csv", "--full-share", "0"], ok=True),
        case("kv", "sink-neg", [*KV, "r.csv", "--sink=-1"]),
        case("kv", "recent-neg", [*KV, "r.csv", "--recent=-1"]),
        case("kv", "recent-zero-sink-zero", [*KV, "r.csv", "--recent", "0", "--sink", "0"]),
        case("kv", "sink-huge", [*KV, "r.csv", "--sink", "99999999999999999999"]),
        case("kv", "razor-ok", [*KV, "razor"], ok=True),
        case("kv", "razor-typo", [*KV, "Razor"]),
        case("kv", "ranking-missing", [*KV, "nope.csv"]),
        case("kv", "ranking-empty", [*KV, "{empty}"]),
        case("kv", "ranking-dir", [*KV, "{adir}"]),
        case("kv", "ranking-nan", [*KV, "{nan_rank}"]),
        case("kv", "ranking-header-only", [*KV, "{header_only}"]),
        case("kv", "ranking-vision", [*KV, "{vhd_csv}"]),
        case("kv", "ranking-part", [*KV, "parts/a.0"]),
        case("kv", "ranking-loop", [*KV, "{loop}"]),
        case("kv", "ranking-safetensors", [*KV, "emb.safetensors"]),
        case("kv", "kv-rule-without", [*NEEDLE_EVAL, "--kv-rule", "max"]),
        case("kv", "generate-kv", [*KVGEN, "r.csv"], ok=True),
        case("kv", "generate-kv-plus-ablate", [*KVGEN, "r.csv", "--ablate", "r.csv", "--top", "2"],
             ok='kv compression and an ablation compose'),
        case("kv", "generate-kv-random-draws", [*KVGEN, "r.csv", "--random-heads"],
             ok="2 KV heads per layer: the random draw equals the ranking's"),
    ]
    # ---------------- generate
    C += [
        case("generate", "max-new-zero", [*GEN[:-2], "--max-new-tokens", "0"]),
        case("generate", "max-new-neg", [*GEN[:-2], "--max-new-tokens", "-1"]),
        case("generate", "max-new-huge", [*GEN[:-2], "--max-new-tokens", "99999999999999999999"],
             ok='stops at the end-of-text token'),
        case("generate", "prompt-empty", ["generate", "--prompt", "", "--max-new-tokens", "1"],
             ok='generation from the BOS token alone'),
        case("generate", "prompt-whitespace", ["generate", "--prompt", "   ", "--max-new-tokens", "1"],
             ok='whitespace is a prompt'),
        case("generate", "prompt-unicode", ["generate", "--prompt", "\u2603\U0001F600 \u202e", "--max-new-tokens",
                                            "1"], ok=True),
        case("generate", "prompt-nul", ["generate", "--prompt", "a\x00b", "--max-new-tokens", "1"], ok='NUL is text'),
        case("generate", "prompt-huge", ["generate", "--prompt", "word " * 20000, "--max-new-tokens", "1"],
             ok="100k characters, within the model's context handling"),
        case("generate", "prompt-surrogate", ["generate", "--prompt", "a\udcffb", "--max-new-tokens", "1"]),
        case("generate", "no-model", ["generate", "--prompt", "x", "--max-new-tokens", "1", "--model", ""]),
        case("generate", "model-dir-empty", [*GEN, "--model", "{adir}"]),
        case("generate", "model-file", [*GEN, "--model", "{empty}"]),
        case("generate", "model-loop", [*GEN, "--model", "{loop}"]),
        case("generate", "model-hub-offline", [*GEN, "--model", "someone/nonexistent-model"]),
        case("generate", "seed-2**63", [*GEN, "--sample", "--seed", str(2 ** 63)], "out of range"),
        case("generate", "decore-alpha-without-decore", [*GEN, "--decore-alpha", "2"], "--decore"),
        case("generate", "sample-seed-neg", [*GEN, "--sample", "--seed", "-1"]),
        case("generate", "seed-huge", [*GEN, "--sample", "--seed", "99999999999999999999999"]),
        case("generate", "scope-without-edit", [*GEN, "--scope", "decode"]),
        case("generate", "decore-no-csv-no-heads", [*GEN, "--decore"]),
        case("generate", "decore-vision", [*VGEN_I, "--decore", "r.csv", "--top", "2"]),
        case("generate", "ablate-and-scale", [*GEN, "--ablate", "r.csv", "--scale", "r.csv", "--top", "2"]),
        case("generate", "random-heads-alone", [*GEN, "--random-heads"]),
        case("generate", "chat-model-template", [*GEN, "--model", "vision", "--image", SCENE]),
    ]
    return C


def _pre(kind: str, env: dict, tmp: Path) -> None:
    """Prepare what a kernel-cache case needs before it runs (in the parent)."""
    cache = Path(env.get("HEADSCOPE_CACHE", ""))
    if kind == "world_cache":
        cache.mkdir(exist_ok=True)
        os.chmod(cache, 0o777)
    elif kind in ("plant", "truncate"):
        src = tmp / "ucache"
        cache.mkdir(mode=0o700, exist_ok=True)
        libs = sorted(src.glob("*.so")) if src.exists() else []
        if not libs:
            return
        for lib in libs:
            shutil.copy(lib, cache / lib.name)
            shutil.copy(str(lib) + ".sha256", cache / (lib.name + ".sha256"))
            if kind == "truncate":
                data = (cache / lib.name).read_bytes()
                (cache / lib.name).write_bytes(data[: len(data) // 2])
            else:  # another library of the same name, recorded hash left as it was
                (cache / lib.name).write_bytes(b"\x7fELF" + b"\0" * 4000)


def _post(kind: str | None, env: dict, tmp: Path, before: set) -> str:
    """What a case's pre-kind wants checked afterwards."""
    if kind == "check_umask":
        cache = Path(env["HEADSCOPE_CACHE"])
        modes = {p.name: oct(p.stat().st_mode & 0o777) for p in [cache, *cache.iterdir()]} if cache.exists() else {}
        return f"modes {modes}"
    if kind == "check_xdg":
        return f"xdg cache: {sorted(p.name for p in (tmp / 'xdg').rglob('*'))}"
    if kind == "offload":
        after = set(os.listdir(tempfile.gettempdir()))
        return f"new temp entries: {sorted(after - before)}"
    return ""


def fill(arg: str, files: dict) -> str:
    """Replace {key} by the fixture file named key (other braces, e.g. prompt fields, stay)."""
    return re.sub(r"\{(\w+)\}", lambda m: files.get(m.group(1), m.group(0)), arg)


def run(c: dict, files: dict, tmp: Path, timeout: int) -> dict:
    argv = [fill(a, files) for a in c["argv"]]
    env = {k: fill(v, files) for k, v in c["env"].items()}
    if c["pre"]:
        _pre(c["pre"], env, tmp)
    before_tmp = set(os.listdir(tempfile.gettempdir()))
    before = {p: p.stat().st_mtime_ns for p in tmp.rglob("*") if p.is_file() and not p.is_symlink()}
    out_path, err_path = tmp / ".case.out", tmp / ".case.err"
    pipe = os.pipe() if c["fsize"] is not None else None  # RLIMIT_FSIZE must not cut the error line
    t0 = time.time()
    pid = os.fork()
    if pid == 0:  # child
        rc = 1
        try:
            if pipe is not None:
                os.close(pipe[0])
                os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
                os.dup2(pipe[1], 2)
            else:
                fo, fe = open(out_path, "w"), open(err_path, "w")
                os.dup2(fo.fileno(), 1)
                os.dup2(fe.fileno(), 2)
            sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", closefd=False), write_through=True)
            sys.stderr = io.TextIOWrapper(os.fdopen(2, "wb", closefd=False), write_through=True)
            os.environ.update(env)
            if c["umask"] is not None:
                os.umask(c["umask"])
            if c["fsize"] is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (c["fsize"], c["fsize"]))
            if c["nobody"] and os.getuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            try:
                rc = cli_main(argv)
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:
                traceback.print_exc()
                rc = 1
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(rc if isinstance(rc, int) else 1)
    deadline = t0 + timeout
    status = None
    while time.time() < deadline:
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = st
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    if pipe is not None:
        os.close(pipe[1])
        with os.fdopen(pipe[0], "rb") as r:
            err_path.write_bytes(r.read())
        out_path.write_text("")
    secs = time.time() - t0
    out = out_path.read_text(errors="replace")
    err = err_path.read_text(errors="replace")
    written = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file() and not p.is_symlink()
                     and p.name not in (".case.out", ".case.err")
                     and (p not in before or before[p] != p.stat().st_mtime_ns))
    lines = [line for line in err.splitlines() if line.strip()]
    if status is None:
        outcome = "timeout"
    elif os.WIFSIGNALED(status):
        outcome, err = "traceback", err + f"\n[killed by signal {os.WTERMSIG(status)}]"
    elif "Traceback" in err:
        outcome = "traceback"
    elif os.WEXITSTATUS(status) == 0:
        outcome = "accepted"
    elif len(lines) == 1 and lines[0].startswith("error: ") and (
            not c["expect"] or c["expect"].lower() in lines[0].lower()):
        outcome = "clear"
    else:
        outcome = "misleading"
    return dict(outcome=outcome, out=out, err=err, written=written, secs=secs,
                post=_post(c["pre"], env, tmp, before_tmp),
                rc=None if status is None else os.waitstatus_to_exitcode(status))


QUICK = {"setup", "shard", "edits", "export", "kernel"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="only the cheap classes (no vision, device, inject runs)")
    ap.add_argument("--only", help="only cases whose class/name holds this")
    ap.add_argument("--timeout", type=int, default=180)
    ap.add_argument("--verbose", action="store_true", help="print stderr of every case")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="headscope-sweep-"))
    os.chmod(tmp, 0o777)  # the chmod-000 cases run as nobody and must reach their files
    files = make_files(tmp)
    cwd = os.getcwd()
    os.chdir(tmp)
    tally: dict[str, Counter] = defaultdict(Counter)
    bad, hung = [], []
    try:
        for c in cases():
            if args.quick and c["cls"] not in QUICK:
                continue
            if args.only and args.only not in f"{c['cls']}/{c['name']}" and c["cls"] != "setup":
                continue
            r = run(c, files, tmp, c["timeout"] or args.timeout)
            tag = r["outcome"] + ("(ok)" if c["ok"] and r["outcome"] == "accepted" else "")
            err1 = r["err"].strip().splitlines()[-1] if r["err"].strip() else ""
            if r["outcome"] == "timeout" and c["ok"]:
                tag = "timeout(ok)"
            tally[c["cls"]][tag] += 1
            print(f"{c['cls']:8} {c['name']:34} {tag:12} rc={r['rc']} {r['secs']:5.1f}s  {err1[:150]}", flush=True)
            if r["outcome"] == "accepted":
                out = " | ".join(line.strip() for line in r["out"].strip().splitlines()[-4:])
                print(f"{'':45} stdout: {out[:300]}")
                print(f"{'':45} wrote: {r['written'][:8]} {r['post']}")
            if r["outcome"] in ("traceback", "timeout", "misleading") or args.verbose:
                print("    " + "\n    ".join(r["err"].strip().splitlines()[-12:]))
            if r["outcome"] == "accepted" and isinstance(c["ok"], str):
                print(f"{'':45} judged acceptable: {c['ok']}")
            if r["outcome"] == "timeout" and c["ok"]:
                tag = "timeout(ok)"
            if r["outcome"] == "traceback":
                bad.append(f"{c['cls']}/{c['name']}")
            elif r["outcome"] == "timeout" and not c["ok"]:
                hung.append(f"{c['cls']}/{c['name']}")
            if c["cls"] == "setup" and r["outcome"] != "accepted":
                print(f"setup case {c['name']} failed; later cases may be off", file=sys.stderr)
    finally:
        os.chdir(cwd)
        if args.keep:
            print(f"kept {tmp}")
        else:
            os.chmod(tmp / "locked.json", 0o600)
            shutil.rmtree(tmp, ignore_errors=True)
    outcomes = ["clear", "misleading", "traceback", "timeout", "timeout(ok)", "accepted", "accepted(ok)"]
    print("\n" + f"{'class':10}" + "".join(f"{o:>14}" for o in outcomes) + f"{'total':>8}")
    total = Counter()
    for cls, cnt in tally.items():
        total.update(cnt)
        print(f"{cls:10}" + "".join(f"{cnt[o]:>14}" for o in outcomes) + f"{sum(cnt.values()):>8}")
    print(f"{'all':10}" + "".join(f"{total[o]:>14}" for o in outcomes) + f"{sum(total.values()):>8}")
    if bad:
        print("tracebacks: " + ", ".join(bad))
    if hung:
        print("timeouts (not counted as failures; look at them): " + ", ".join(hung))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
