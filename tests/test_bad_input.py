"""Bad input, tried as a new user would, on every command and input file (issue 14).

Each case runs ``headscope.cli.main(argv)`` in-process and asserts its exact outcome: exit status 2
with one ``error: ...`` line containing a fragment, or status 0 with a fragment in the output.
Cases marked ``early`` must fail before any model weights are loaded (the loader is replaced by
one that fails the test).

``python tests/test_bad_input.py`` counts outcomes without asserting: clear errors, other
errors (exit 2, not the expected text), tracebacks, silent results.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import sys
import traceback
from pathlib import Path

import pytest

NEEDLE = ["--task", "needle", "--quiet", "--lengths", "64", "--depths", "50"]
SINKS = ["score", "--task", "sinks", "--quiet"]
SAFETY = ["score", "--task", "safety", "--quiet", "--method", "sahara", "--max-heads", "1", "--limit", "2"]
GEN = ["generate", "--prompt", "The secret", "--max-new-tokens", "2"]
VHD = ["score", "--task", "vhd", "--quiet"]
ICL = ["eval", "--task", "icl", "--quiet"]
FIT = ["inject", "fit", "--quiet"]

# (id, argv, expected status, fragment of stderr (status 2) or stdout (status 0), early)
CASES = [
    # ---- output paths: checked before any model is loaded
    ("out-is-dir", ["score", *NEEDLE, "--out", "{dir}"], 2, "is a directory", True),
    ("out-unwritable", ["score", *NEEDLE, "--out", "/proc/headscope.csv"], 2, "cannot write", True),
    ("out-is-sidecar", ["score", *NEEDLE, "--out", "{tmp}/rank.json"], 2, "sidecar", True),
    ("out-parent-is-file", ["score", *NEEDLE, "--out", "{utf8}/x.csv"], 2, "not a folder", True),
    ("out-csv-dir-sidecar", ["score", *NEEDLE, "--out", "{tmp}/dirside.csv"], 2, "is a directory", True),
    ("plot-is-dir", ["overlap", "{good}", "{good}", "--top", "2", "--plot", "{dir}"], 2, "is a directory", True),
    ("state-is-dir", [*SAFETY, "--state", "{dir}"], 2, "is a directory", True),
    ("state-unwritable", [*SAFETY, "--state", "/proc/state.json"], 2, "cannot write", True),
    # ---- text inputs: regular files, UTF-8, bounded size
    ("text-dev-zero", [*SINKS, "--text", "/dev/zero"], 2, "not a regular file", True),
    ("text-dir", [*SINKS, "--text", "{dir}"], 2, "not a regular file", True),
    ("text-latin1", [*SINKS, "--text", "{latin1}"], 2, "not UTF-8", True),
    ("text-missing", [*SINKS, "--text", "{tmp}/nope.txt"], 2, "does not exist", True),
    ("text-empty", [*SINKS, "--text", "{empty}"], 2, "is empty", True),
    ("text-huge", [*SINKS, "--text", "{huge}"], 2, "too large", True),
    ("haystack-latin1", ["eval", *NEEDLE, "--haystack", "{latin1}"], 2, "not UTF-8", True),
    ("haystack-dev-zero", ["eval", *NEEDLE, "--haystack", "/dev/zero"], 2, "not a regular file", True),
    ("haystack-empty", ["eval", *NEEDLE, "--haystack", "{empty}"], 2, "is empty", True),
    ("needles-latin1", ["eval", *NEEDLE, "--needles", "{latin1}"], 2, "not UTF-8", True),
    ("needles-dev-zero", ["eval", *NEEDLE, "--needles", "/dev/zero"], 2, "not a regular file", True),
    ("needles-missing", ["eval", *NEEDLE, "--needles", "{tmp}/nope.jsonl"], 2, "does not exist", True),
    ("needles-bad-json", ["eval", *NEEDLE, "--needles", "{needles_badjson}"], 2, "not valid JSON", True),
    ("needles-list-row", ["eval", *NEEDLE, "--needles", "{needles_list}"], 2, "lacks non-empty field", True),
    ("needles-no-answer", ["eval", *NEEDLE, "--needles", "{needles_noanswer}"], 2, "lacks non-empty field", True),
    ("needles-space-answer", ["eval", *NEEDLE, "--needles", "{needles_space}"], 2, "blank", True),
    ("needles-answer-absent", ["eval", *NEEDLE, "--needles", "{needles_absent}"], 2, "does not contain its answer", True),
    ("needles-number-answer", ["eval", *NEEDLE, "--needles", "{needles_number}"], 2, "must be text", True),
    ("needles-empty", ["eval", *NEEDLE, "--needles", "{empty}"], 2, "holds no needles", True),
    ("needles-unknown-tokens", ["eval", *NEEDLE, "--needles", "{needles_unk}"], 2, "tokenizer", False),
    ("lengths-empty", ["eval", "--task", "needle", "--lengths", ""], 2, "--lengths", True),
    ("lengths-zero", ["eval", "--task", "needle", "--lengths", "0"], 2, "--lengths", True),
    ("lengths-negative", ["eval", "--task", "needle", "--lengths=-5"], 2, "--lengths", True),
    ("lengths-text", ["eval", "--task", "needle", "--lengths", "abc"], 2, "comma-separated integers", True),
    ("depths-nan", ["eval", "--task", "needle", "--depths", "nan"], 2, "finite", True),
    ("depths-out-of-range", ["eval", "--task", "needle", "--depths", "150"], 2, "[0, 100]", False),
    ("depths-empty", ["eval", "--task", "needle", "--depths", ","], 2, "--depths", True),
    ("chat-template-on", ["eval", *NEEDLE, "--chat-template", "on"], 2, "chat template", False),
    # ---- ranking CSVs and sidecars
    ("csv-missing", ["eval", *NEEDLE, "--ablate", "{tmp}/nope.csv", "--top", "1"], 2, "does not exist", True),
    ("csv-header-only", ["eval", *NEEDLE, "--ablate", "{csv_header}", "--top", "1"], 2, "no rows", True),
    ("csv-layer-x", ["eval", *NEEDLE, "--ablate", "{csv_layer_x}", "--top", "1"], 2, "integer", True),
    ("csv-float-index", ["eval", *NEEDLE, "--ablate", "{csv_float}", "--top", "1"], 2, "integer", True),
    ("csv-negative-index", ["eval", *NEEDLE, "--ablate", "{csv_negative}", "--top", "1"], 2, "outside", True),
    ("csv-duplicate", ["eval", *NEEDLE, "--ablate", "{csv_dup}", "--top", "1"], 2, "twice", True),
    ("csv-score-text", ["eval", *NEEDLE, "--ablate", "{csv_score_text}", "--top", "1"], 2, "score", True),
    ("csv-score-inf", ["eval", *NEEDLE, "--ablate", "{csv_inf}", "--top", "1"], 2, "infinite", True),
    ("csv-all-nan", ["eval", *NEEDLE, "--ablate", "{csv_nan}", "--top", "1"], 2, "no scored heads", True),
    ("csv-top-beyond-rows", ["eval", *NEEDLE, "--ablate", "{csv_partial}", "--top", "5"], 2, "scores only 2", True),
    ("csv-top-zero", ["eval", *NEEDLE, "--ablate", "{good}", "--top", "0"], 2, "--top", True),
    ("csv-top-negative", ["eval", *NEEDLE, "--ablate", "{good}", "--top=-1"], 2, "--top", True),
    ("csv-no-columns", ["eval", *NEEDLE, "--ablate", "{csv_cols}", "--top", "1"], 2, "lacks column", True),
    ("csv-latin1", ["eval", *NEEDLE, "--ablate", "{latin1_csv}", "--top", "1"], 2, "not UTF-8", True),
    ("csv-dir", ["eval", *NEEDLE, "--ablate", "{dir}", "--top", "1"], 2, "not a regular file", True),
    ("csv-dev-zero", ["eval", *NEEDLE, "--ablate", "/dev/zero", "--top", "1"], 2, "not a regular file", True),
    ("csv-empty-file", ["eval", *NEEDLE, "--ablate", "{empty_csv}", "--top", "1"], 2, "no rows", True),
    ("sidecar-bad-json", ["eval", *NEEDLE, "--ablate", "{side_badjson}", "--top", "1"], 2, "sidecar", True),
    ("sidecar-not-object", ["eval", *NEEDLE, "--ablate", "{side_list}", "--top", "1"], 2, "sidecar", True),
    ("sidecar-bad-shape", ["eval", *NEEDLE, "--ablate", "{side_shape}", "--top", "1"], 2, "shape", True),
    ("sidecar-head-outside", ["eval", *NEEDLE, "--ablate", "{side_small}", "--top", "1"], 2, "outside", True),
    ("sidecar-stale", ["eval", *NEEDLE, "--ablate", "{side_stale}", "--top", "1"], 2, "does not match", True),
    ("csv-no-sidecar-outside-model", [*GEN, "--ablate", "{nosidecar_big}", "--top", "1"], 2, "outside", False),
    ("csv-no-sidecar-ok", [*GEN, "--ablate", "{nosidecar}", "--top", "1"], 0, "ablating (zero, both) L0H1\n", False),
    ("overlap-bad-csv", ["overlap", "{good}", "{csv_dup}", "--top", "2"], 2, "twice", True),
    ("overlap-shapes", ["overlap", "{good}", "{side_small_ok}", "--top", "2"], 2, "different models", True),
    ("overlap-top-p-nan", ["overlap", "{good}", "{good}", "--top-p", "nan"], 2, "finite", True),
    ("overlap-threshold-inf", ["overlap", "{good}", "{good}", "--threshold", "inf"], 2, "finite", True),
    ("overlap-ok", ["overlap", "{good}", "{good}", "--top", "2"], 0, "shared: L0H1, L1H3\n", True),
    # ---- numbers that make the result meaningless
    ("alpha-nan", ["eval", *NEEDLE, "--scale", "{good}", "--top", "1", "--alpha", "nan"], 2, "finite", True),
    ("alpha-inf", ["eval", *NEEDLE, "--scale", "{good}", "--top", "1", "--alpha", "inf"], 2, "finite", True),
    ("alpha-text", ["eval", *NEEDLE, "--scale", "{good}", "--top", "1", "--alpha", "big"], 2, "--alpha", True),
    ("decore-alpha-nan", ["eval", "--task", "context-conflict", "--decore", "{good}", "--top", "1",
                          "--decore-alpha", "nan"], 2, "finite", True),
    ("draws-zero", ["eval", *NEEDLE, "--random", "2", "--draws", "0"], 2, "--draws", True),
    ("random-zero", ["eval", *NEEDLE, "--random", "0"], 2, "--random", False),
    ("random-too-many", ["eval", *NEEDLE, "--random", "999"], 2, "--random", False),
    ("exclude-without-random", ["eval", *NEEDLE, "--exclude", "{good}"], 2, "--exclude", True),
    ("two-edits", ["eval", *NEEDLE, "--ablate", "{good}", "--scale", "{good}", "--top", "1"], 2, "only one", True),
    ("ablate-without-top", ["eval", *NEEDLE, "--ablate", "{good}"], 2, "--top", True),
    ("batch-size-zero", ["eval", *NEEDLE, "--batch-size", "0"], 2, "--batch-size", True),
    ("show-negative", ["score", *NEEDLE, "--show=-1"], 2, "--show", True),
    ("seed-text", ["eval", *NEEDLE, "--seed", "x"], 2, "--seed", True),
    ("unknown-task", ["eval", "--task", "nope"], 2, "invalid choice", True),
    ("unknown-flag", ["eval", *NEEDLE, "--frobnicate"], 2, "unrecognized", True),
    # ---- edits JSON (--edits)
    ("edits-missing", ["eval", *NEEDLE, "--edits", "{tmp}/nope.json"], 2, "does not exist", True),
    ("edits-dev-zero", ["eval", *NEEDLE, "--edits", "/dev/zero"], 2, "not a regular file", True),
    ("edits-nan-strength", ["eval", *NEEDLE, "--edits", "{edits_nan}"], 2, "finite", True),
    ("edits-text-strength", ["eval", *NEEDLE, "--edits", "{edits_text}"], 2, "must be a number", True),
    ("edits-float-head", ["eval", *NEEDLE, "--edits", "{edits_float_head}"], 2, "pair of integers", True),
    ("edits-not-list", ["eval", *NEEDLE, "--edits", "{prompts_number}"], 2, "list of edit objects", True),
    ("edits-empty-list", ["eval", *NEEDLE, "--edits", "{state_list}"], 2, "holds no edits", True),
    ("vhr-layers-text", ["eval", *NEEDLE, "--vhr", "{good}", "--vhr-layers", "a,b"], 2, "--vhr-layers", True),
    # ---- model loading
    ("dtype-nonsense", ["eval", *NEEDLE, "--dtype", "nonsense"], 2, "--dtype", True),
    ("dtype-int8", ["eval", *NEEDLE, "--dtype", "int8"], 2, "--dtype", True),
    ("device-tpu9", ["eval", *NEEDLE, "--device", "tpu9"], 2, "--device", True),
    ("device-cuda", ["eval", *NEEDLE, "--device", "cuda"], 2, "CUDA", True),
    ("device-cuda-index", ["eval", *NEEDLE, "--device", "cuda:7"], 2, "CUDA", True),
    ("model-missing", ["eval", *NEEDLE, "--model", "{tmp}/no-such-model"], 2, "could not load", True),
    ("model-file", ["eval", *NEEDLE, "--model", "{utf8}"], 2, "is a file", True),
    ("model-empty-dir", ["eval", *NEEDLE, "--model", "{dir}"], 2, "without config.json", True),
    ("model-config-empty", ["eval", *NEEDLE, "--model", "{model_empty_config}"], 2, "config.json", True),
    ("model-config-bad-json", ["eval", *NEEDLE, "--model", "{model_bad_config}"], 2, "not valid JSON", True),
    ("model-config-list", ["eval", *NEEDLE, "--model", "{model_list_config}"], 2, "config.json", True),
    # ---- generate
    ("prompt-not-utf8", ["generate", "--prompt", "caf\udce9", "--max-new-tokens", "2"], 2, "UTF-8", True),
    ("max-new-tokens-zero", ["generate", "--prompt", "x", "--max-new-tokens", "0"], 2, "--max-new-tokens", True),
    ("generate-alpha-nan", [*GEN, "--scale", "{good}", "--top", "1", "--alpha", "nan"], 2, "finite", True),
    ("generate-top-beyond", [*GEN, "--ablate", "{csv_partial}", "--top", "3"], 2, "scores only 2", True),
    ("generate-ok", [*GEN, "--ablate", "{good}", "--top", "2"], 0, "ablating (zero, both) L0H1, L1H3\n", False),
    # ---- safety / refusal: prompts and state files
    ("limit-zero", [*SAFETY[:-2], "--limit", "0"], 2, "--limit", True),
    ("prompts-missing", [*SAFETY, "--prompts", "{tmp}/nope.txt"], 2, "does not exist", True),
    ("prompts-latin1", [*SAFETY, "--prompts", "{latin1}"], 2, "not UTF-8", True),
    ("prompts-dev-zero", [*SAFETY, "--prompts", "/dev/zero"], 2, "not a regular file", True),
    ("prompts-csv-column", [*SAFETY, "--prompts", "{prompts_csv}", "--column", "nope"], 2, "nope", True),
    ("prompts-jsonl-number", [*SAFETY, "--prompts", "{prompts_number}"], 2, "JSON object or string", True),
    ("prompts-blank", [*SAFETY, "--prompts", "{blank}"], 2, "holds no queries", True),
    ("eps-nan", [*SAFETY, "--eps", "nan"], 2, "finite", True),
    ("state-bad-json", [*SAFETY, "--state", "{state_badjson}"], 2, "state file", True),
    ("state-not-object", [*SAFETY, "--state", "{state_list}"], 2, "state file", True),
    ("state-incomplete", [*SAFETY, "--state", "{state_incomplete}"], 2, "state file", False),
    ("refusal-limit-zero", ["eval", "--task", "refusal", "--limit", "0"], 2, "--limit", True),
    # ---- other commands' inputs
    ("concept-missing", ["score", "--task", "pursuit", "--concept", "{tmp}/nope.txt"], 2, "does not exist", True),
    ("concept-dev-zero", ["score", "--task", "pursuit", "--concept", "/dev/zero"], 2, "not a regular file", True),
    ("concept-latin1", ["score", "--task", "pursuit", "--concept", "{latin1}"], 2, "not UTF-8", True),
    ("pursuit-edit-alpha-nan", ["score", "--task", "pursuit", "--concept", "{utf8}", "--edit-alpha", "nan"],
     2, "finite", True),
    ("pursuit-k-zero", ["score", "--task", "pursuit", "--concept", "{utf8}", "--k", "0"], 2, "--k", True),
    ("pairs-missing", ["score", "--task", "circuit", "--pairs", "{tmp}/nope.jsonl"], 2, "does not exist", True),
    ("pairs-bad-json", ["score", "--task", "circuit", "--pairs", "{needles_badjson}"], 2, "not valid JSON", True),
    ("pairs-dev-zero", ["score", "--task", "circuit", "--pairs", "/dev/zero"], 2, "not a regular file", True),
    ("circuit-n-zero", ["score", "--task", "circuit", "--generate", "ioi", "--n", "0"], 2, "--n", True),
    ("classic-sequences-zero", ["score", "--task", "induction", "--sequences", "0"], 2, "--sequences", True),
    ("context-conflict-prompts-zero", ["eval", "--task", "context-conflict", "--prompts", "0"], 2, "--prompts", True),
    ("sinks-eps-nan", [*SINKS, "--eps", "nan"], 2, "finite", True),
    ("sinks-max-tokens-zero", [*SINKS, "--max-tokens", "0"], 2, "--max-tokens", True),
    # ---- heads by name (--heads, --exclude) and sahara's --max-heads
    ("heads-bad-name", ["eval", *NEEDLE, "--ablate", "--heads", "L1X"], 2, "cannot read", True),
    ("heads-and-csv", ["eval", *NEEDLE, "--ablate", "{good}", "--heads", "L1H5"], 2, "not both", True),
    ("heads-with-top", ["eval", *NEEDLE, "--ablate", "--heads", "L1H5", "--top", "2"], 2, "--top K picks", True),
    ("heads-outside-model", ["eval", *NEEDLE, "--ablate", "--heads", "L9H9"], 2, "invalid head(s) L9H9", False),
    ("heads-without-edit", ["eval", *NEEDLE, "--heads", "L1H5"], 2, "say what to do", True),
    ("exclude-bad-name", ["eval", *NEEDLE, "--random", "2", "--exclude", "L1X"], 2, "cannot read", True),
    ("exclude-bad-csv", ["eval", *NEEDLE, "--random", "2", "--exclude", "{csv_dup}"], 2, "twice", True),
    ("safety-heads-count", [*SAFETY, "--heads", "3"], 2, "use --max-heads 3", True),
    ("safety-heads-bad-name", [*SAFETY, "--heads", "L1X"], 2, "cannot read", True),
    ("safety-heads-outside", [*SAFETY, "--heads", "L9H9"], 2, "invalid head(s) L9H9", False),
    ("safety-max-heads-zero", [*SAFETY[:-4], "--max-heads", "0"], 2, "--max-heads", True),
    # ---- vision: score --task vhd, eval --task hallucination, --vhr, --var, --image
    ("vhd-images-empty-dir", [*VHD, "--images", "{dir}", "--prompts", "{utf8}"], 2, "holds no image files", True),
    ("vhd-images-file", [*VHD, "--images", "{utf8}", "--prompts", "{utf8}"], 2, "is not a folder", True),
    ("vhd-prompts-latin1", [*VHD, "--images", "{imgs}", "--prompts", "{latin1}"], 2, "not UTF-8", True),
    ("vhd-prompts-dev-zero", [*VHD, "--images", "{imgs}", "--prompts", "/dev/zero"], 2, "not a regular file", True),
    ("vhd-prompts-empty", [*VHD, "--images", "{imgs}", "--prompts", "{blank}"], 2, "is empty", True),
    ("vhd-jsonl-image-number", [*VHD, "--images", "{imgs}", "--prompts", "{vhd_number}"], 2, "'image' text", True),
    ("vhd-jsonl-image-missing", [*VHD, "--images", "{imgs}", "--prompts", "{vhd_missing}"], 2, "does not exist", True),
    ("vhd-image-corrupt", [*VHD, "--images", "{imgs_bad}", "--prompts", "{utf8}"], 2, "cannot read image", True),
    ("vhd-layers-text", [*VHD, "--images", "{imgs}", "--prompts", "{utf8}", "--layers", "a"], 2, "--layers", True),
    ("vhd-text-model", [*VHD, "--images", "{imgs}", "--prompts", "{utf8}", "--model", "retrieval"], 2,
     "needs a vision-language model", False),
    ("hallucination-scenes-zero", ["eval", "--task", "hallucination", "--scenes", "0"], 2, "--scenes", True),
    ("hallucination-caption-no-image", ["eval", "--task", "hallucination", "--caption-prompt", "Describe it."], 2,
     "no <image> placeholder", True),
    ("hallucination-question-no-slot", ["eval", "--task", "hallucination", "--question-prompt", "<image> Any?"], 2,
     "{object} slot", True),
    ("hallucination-tokens-zero", ["eval", "--task", "hallucination", "--max-new-tokens", "0"], 2, "--max-new-tokens",
     True),
    ("vhr-bad-csv", ["eval", *NEEDLE, "--vhr", "{csv_dup}"], 2, "twice", True),
    ("vhr-no-sidecar-outside", ["eval", *NEEDLE, "--vhr", "{nosidecar_big}"], 2, "outside", False),
    ("random-heads-without-vhr", ["eval", *NEEDLE, "--random-heads"], 2, "--random-heads needs --vhr", True),
    ("vhr-reselect-without-per-input", ["eval", *NEEDLE, "--vhr-reselect"], 2, "--vhr-reselect needs --vhr per-input",
     True),
    ("vhr-per-input-text-model", [*GEN, "--vhr", "per-input"], 2, "needs a vision-language model", False),
    ("var-text-model", [*GEN, "--var"], 2, "needs a vision-language model", False),
    ("var-p-nan", [*GEN, "--var", "--var-p", "nan"], 2, "finite", True),
    ("var-rule-unknown", [*GEN, "--var", "--var-rule", "bos"], 2, "invalid choice", True),
    ("var-rule-without-var", [*GEN, "--var-rule", "first-token"], 2, "--var-rule needs --var", True),
    ("var-tau-nan", [*GEN, "--var", "--var-tau", "nan"], 2, "finite", True),
    ("image-missing", [*GEN, "--image", "{tmp}/nope.png"], 2, "does not exist", True),
    ("image-corrupt", [*GEN, "--image", "{utf8}"], 2, "cannot read image", True),
    # ---- in-context learning: eval --task icl, inject fit, --inject
    ("icl-tasks-missing", [*ICL, "--tasks", "{tmp}/nope.jsonl"], 2, "does not exist", True),
    ("icl-tasks-latin1", [*ICL, "--tasks", "{latin1}"], 2, "not UTF-8", True),
    ("icl-tasks-rows", [*ICL, "--tasks", "{needles_list}"], 2, "lacks 'input' or 'output'", True),
    ("icl-tasks-empty", [*ICL, "--tasks", "{empty}"], 2, "holds no pairs", True),
    ("icl-shots-negative", [*ICL, "--shots=-1"], 2, "--shots", True),
    ("icl-shots-too-many", [*ICL, "--tasks", "{icl_small}", "--shots", "50"], 2, "fewer than 50 shots", True),
    ("icl-queries-zero", [*ICL, "--queries", "0"], 2, "--queries", True),
    ("icl-template", [*ICL, "--tasks", "{icl_small}", "--template", "Q: {{x}}"], 2, "end with one {y}", True),
    ("inject-missing", [*ICL, "--inject", "{tmp}/nope.safetensors"], 2, "does not exist", True),
    ("inject-not-safetensors", [*ICL, "--inject", "{utf8}"], 2, "not a safetensors task embedding", True),
    ("inject-nan", [*ICL, "--inject", "{emb_nan}"], 2, "NaN or infinite", True),
    ("inject-shape", [*ICL, "--inject", "{emb_shape}"], 2, "vectors must be [layers, heads, head_dim]", True),
    ("inject-other-model", [*ICL, "--tasks", "{icl_small}", "--inject", "{emb_small}"], 2, "fit one for this model",
     False),
    ("generate-inject-missing", [*GEN, "--inject", "{tmp}/nope.safetensors"], 2, "does not exist", True),
    ("fit-task-missing", [*FIT, "--task", "{tmp}/nope.jsonl", "--out", "{tmp}/e.safetensors"], 2, "does not exist",
     True),
    ("fit-out-dir", [*FIT, "--task", "{icl_small}", "--out", "{dir}"], 2, "is a directory", True),
    ("fit-scores-sidecar", [*FIT, "--task", "{icl_small}", "--out", "{tmp}/e.safetensors", "--scores",
                            "{tmp}/s.json"], 2, "sidecar", True),
    ("fit-shots-zero", [*FIT, "--task", "{icl_small}", "--out", "{tmp}/e.safetensors", "--shots", "0"], 2, "--shots",
     True),
    ("fit-lr-zero", [*FIT, "--task", "{icl_small}", "--out", "{tmp}/e.safetensors", "--lr", "0"], 2, "--lr", True),
    ("fit-lr-nan", [*FIT, "--task", "{icl_small}", "--out", "{tmp}/e.safetensors", "--lr", "nan"], 2, "finite", True),
    ("fit-too-few-pairs", [*FIT, "--task", "{icl_small}", "--out", "{tmp}/e.safetensors", "--shots", "40"], 2,
     "fewer than 41 shots", True),
]


def _files(tmp: Path) -> dict[str, str]:
    """The input files the cases refer to, written under ``tmp``."""
    f: dict[str, str] = {"tmp": str(tmp)}

    def put(name: str, content: str | bytes, key: str | None = None) -> str:
        path = tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        f[key or name.split(".")[0]] = str(path)
        return str(path)

    (tmp / "adir").mkdir()
    f["dir"] = str(tmp / "adir")
    put("utf8.txt", "red\ngreen\n")
    put("latin1.txt", "caf\xe9 au lait\n".encode("latin-1"))
    put("latin1_csv.csv", "layer,head,score\n0,0,1\n# caf\xe9\n".encode("latin-1"))
    put("empty.txt", "")
    put("empty_csv.csv", "")
    put("blank.txt", "\n   \n\n")
    with open(tmp / "huge.txt", "wb") as handle:  # sparse: costs no disk
        handle.truncate(2 << 30)
    f["huge"] = str(tmp / "huge.txt")
    good = "The secret number of the red fox is 4821."
    put("needles_badjson.jsonl", "{not json\n")
    put("needles_list.jsonl", "[1, 2]\n")
    put("needles_noanswer.jsonl", json.dumps({"needle": good, "question": "q?"}) + "\n")
    put("needles_space.jsonl", json.dumps({"needle": good, "question": "q?", "answer": "   "}) + "\n")
    put("needles_absent.jsonl", json.dumps({"needle": good, "question": "q?", "answer": "9999"}) + "\n")
    put("needles_number.jsonl", json.dumps({"needle": good, "question": "q?", "answer": 4821}) + "\n")
    put("needles_unk.jsonl", json.dumps({"needle": "\u4e00\u4e01 \u4e02.", "question": "\u4e03?",
                                         "answer": "\u4e02"}) + "\n")
    # ranking CSVs (4 layers x 8 heads, the retrieval organism's grid)
    rows = "".join(f"{layer},{head},{0.1 * (layer * 8 + head) / 32:.4f}\n" for layer in range(4) for head in range(8))
    rows = rows.replace("0,1,0.0031", "0,1,0.99").replace("1,3,0.0344", "1,3,0.98")
    header = "layer,head,score\n"
    meta = {"method": "test", "model": "retrieval", "params": {}, "shape": [4, 8]}
    put("good.csv", header + rows)
    put("good.json", json.dumps(meta), key="good_sidecar")
    put("nosidecar.csv", header + "0,1,0.9\n2,2,0.5\n")
    put("nosidecar_big.csv", header + "0,1,0.9\n9,2,0.5\n")
    for name, body in {"csv_header": "", "csv_layer_x": "x,0,1\n", "csv_float": "1.7,0,1\n", "csv_negative": "-1,0,1\n",
                       "csv_dup": "0,0,1\n0,0,2\n", "csv_score_text": "0,0,high\n", "csv_inf": "0,0,inf\n",
                       "csv_nan": "0,0,nan\n0,1,\n", "csv_partial": "0,0,1\n0,1,2\n"}.items():
        put(f"{name}.csv", header + body)
        put(f"{name}.json", json.dumps(meta), key=f"{name}_sidecar")
    put("csv_cols.csv", "l,h,s\n0,0,1\n")
    put("dirside.csv", "")
    (tmp / "dirside.json").mkdir()
    for name, side in {"side_badjson": "{oops", "side_list": "[4, 8]",
                       "side_shape": json.dumps({**meta, "shape": [4, "x"]}),
                       "side_small": json.dumps({**meta, "shape": [1, 1]})}.items():
        put(f"{name}.csv", header + rows)
        put(f"{name}.json", side, key=f"{name}_sidecar")
    put("side_small_ok.csv", header + "0,0,1\n")
    put("side_small_ok.json", json.dumps({**meta, "shape": [1, 1]}), key="side_small_ok_sidecar")
    # a sidecar written for another CSV: hash of different content
    from headscope.scores import HeadScores
    import torch

    stale = HeadScores(torch.arange(32.0).view(4, 8), "test", "retrieval").to_csv(tmp / "side_stale.csv")
    stale.write_text(stale.read_text().replace("3,7,31.0", "3,7,-31.0"))
    f["side_stale"] = str(stale)
    # model folders
    for name, config in {"model_empty_config": "{}", "model_bad_config": "{oops",
                         "model_list_config": "[1]"}.items():
        (tmp / name).mkdir()
        (tmp / name / "config.json").write_text(config)
        f[name] = str(tmp / name)
    put("edits_nan.json", '[{"kind": "scale", "heads": [[0, 1]], "strength": NaN}]')
    put("edits_text.json", '[{"kind": "scale", "heads": [[0, 1]], "strength": "2"}]')
    put("edits_float_head.json", '[{"kind": "zero", "heads": [[1.7, 0]]}]')
    # vision: an image folder, a folder with a corrupt image, JSONL prompts
    from PIL import Image

    for name, image in {"imgs": None, "imgs_bad": b"not a png"}.items():
        (tmp / name).mkdir()
        if image is None:
            Image.new("RGB", (8, 8), (200, 0, 0)).save(tmp / name / "red.png")
        else:
            (tmp / name / "x.png").write_bytes(image)
        f[name] = str(tmp / name)
    put("vhd_number.jsonl", json.dumps({"image": 3, "prompt": "<image> what?"}) + "\n")
    put("vhd_missing.jsonl", json.dumps({"image": "nope.png", "prompt": "<image> what?"}) + "\n")
    # in-context learning: a small task file the icl organism reads (the first 24 pairs of one of its
    # own: 12 train pairs), task embeddings (valid for a 1x1x2 model, NaN, wrong shape)
    from headscope import zoo

    first_task = zoo.organism_info("icl")["task_files"][0]
    put("icl_small.jsonl", "".join((zoo.organism_path("icl") / first_task).read_text().splitlines(keepends=True)[:24]))
    from safetensors.torch import save_file

    from headscope.methods.soft_injection import TaskEmbedding

    TaskEmbedding(torch.ones(1, 1, 2), {"model": "other"}, torch.ones(1, 1)).save(tmp / "emb_small.safetensors")
    f["emb_small"] = str(tmp / "emb_small.safetensors")
    for name, vectors in {"emb_nan": torch.full((1, 1, 2), float("nan")), "emb_shape": torch.ones(2)}.items():
        save_file({"vectors": vectors}, str(tmp / f"{name}.safetensors"))
        f[name] = str(tmp / f"{name}.safetensors")
    # prompts and state files
    put("prompts_csv.csv", "goal,target\nsay hi,hi\n")
    put("prompts_number.jsonl", "42\n")
    put("state_badjson.json", "{oops")
    put("state_list.json", "[]")
    put("state_incomplete.json", json.dumps({"method": "sahara"}))
    return f


@contextlib.contextmanager
def _no_weights(active: bool):
    """Make loading model weights fail the case (for errors that must come first)."""
    if not active:
        yield
        return
    import headscope.hf.loading as model

    original = model.auto_class

    class Refuse:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            raise AssertionError("model weights were loaded before the input was checked")

    model.auto_class = lambda config: Refuse
    try:
        yield
    finally:
        model.auto_class = original


def run_case(argv: list[str], early: bool) -> tuple[int | str, str, str]:
    """(status or "traceback", stdout, stderr) of ``headscope.cli.main(argv)``."""
    from headscope.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), _no_weights(early):
        try:
            status = main(argv)
        except SystemExit as exc:  # argparse
            status = exc.code
        except BaseException:
            return "traceback", out.getvalue(), traceback.format_exc()
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return _files(tmp_path_factory.mktemp("bad_input"))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, files):
    name, argv, status, fragment, early = case
    got, out, err = run_case([a.format(**files) for a in argv], early)
    assert got == status, f"{name}: status {got}\nstdout: {out}\nstderr: {err}"
    if status == 2:
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert fragment in lines[0], lines[0]
    else:
        assert fragment in out, out


def test_case_count():
    assert len(CASES) >= 80


class _StillRunning(Exception):
    pass


def _count(unbounded: bool, start: str | None, alarm: int) -> None:
    """Tally outcomes. ``start``: begin at this case; ``alarm``: a case still running after this many
    seconds accepted its input (counted silent if an error was expected)."""
    import signal
    import tempfile

    def ring(*_):
        raise _StillRunning

    signal.signal(signal.SIGALRM, ring)
    cases = CASES[[c[0] for c in CASES].index(start):] if start else CASES

    with tempfile.TemporaryDirectory() as tmp:
        files = _files(Path(tmp))
        tally: dict[str, list[str]] = {"clear": [], "other error": [], "traceback": [], "silent": [], "ok": [],
                                       "wrong result": []}
        for name, argv, status, fragment, early in cases:
            if unbounded and any(a in ("/dev/zero", "{huge}") for a in argv):
                tally["traceback"].append(name)  # reads until memory runs out: not run
                print(f"{'traceback':12s} {name}: not run (reads without bound, MemoryError)", flush=True)
                continue
            signal.alarm(alarm)
            try:
                got, out, err = run_case([a.format(**files) for a in argv], False)
            except _StillRunning:
                got, out, err = 0, "", f"still running after {alarm} s: input accepted"
            signal.alarm(0)
            if got == "traceback" and "_StillRunning" in err:
                got, err = 0, f"still running after {alarm} s: input accepted"
            if got == "traceback":
                kind = "traceback"
            elif status == 2:
                kind = "silent" if got == 0 else "clear" if got == 2 and fragment in err else "other error"
            else:
                kind = "ok" if got == 0 and fragment in out else "wrong result"
            tally[kind].append(name)
            print(f"{kind:12s} {name}: {(err.strip().splitlines() or [''])[-1][:150]}", flush=True)
        print({k: len(v) for k, v in tally.items()}, "of", len(cases))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    import conftest  # noqa: F401  (offline)

    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--unbounded-reads", action="store_true", help="before the fix: skip what reads /dev/zero")
    parser.add_argument("--from", dest="start")
    parser.add_argument("--alarm", type=int, default=0)
    flags = parser.parse_args()
    _count(flags.unbounded_reads, flags.start, flags.alarm)
