"""Every file a command reads or writes, checked together before any model is loaded.

Two tables say which flags name files: the outputs (with the files each one writes beside it: a
ranking CSV's ``.json`` sidecar, an export's ``.headscope.json``) and the inputs (with a ranking
CSV's sidecar). :func:`check` refuses, each as a one-line error naming both flags:

- an empty path (``--out ''`` would write nothing, ``--needles ''`` would read the default),
- an output that is not writable, or whose name (or the temp file it is written through) is longer
  than the file system allows,
- two outputs that are one file (``--out emb.json --scores emb.csv``: the sidecar of emb.csv is
  emb.json), and an output that is an input (``--out needles.jsonl --needles needles.jsonl``),
  compared after resolving links and ``.`` / ``..`` (``./a.csv`` is ``a.csv``),
- an output that would replace an existing ranking's sidecar, or a ranking whose sidecar name is
  taken by a file that is not a ranking sidecar (written by another command earlier).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from headscope.cli import edit_flags
from headscope.errors import HeadscopeError
from headscope.formats import DUO_TSV, sidecar_of
from headscope.io import temp_name
from headscope.scores import check_ranking_path, sidecar_path
from headscope.validate import check_output

# dest -> flag of the options that name output files (their kind is decided per command: outputs())
OUTPUT_FLAGS = {"out": "--out", "scores": "--scores", "plot": "--plot", "state": "--state", "export_out": "--out"}
# dest -> flag of the options that name input files or folders (a string, or a list of strings)
INPUT_FLAGS = {"needles": "--needles", "haystack": "--haystack", "pairs": "--pairs", "concept": "--concept",
               "text": "--text", "prompts": "--prompts", "tasks": "--tasks", "images": "--images",
               "image": "--image", "edits": "--edits", "exclude": "--exclude", "parts": "PART",
               "ranking": "RANKING", "a": "A", "b": "B"}


def outputs(args) -> list[tuple[str, Path, str]]:
    """(label, path, role) of every file the command will write; role: "ranking" (a ranking CSV),
    "sidecar" (its metadata) or "file"."""
    found = []
    for dest, flag in OUTPUT_FLAGS.items():
        value = getattr(args, dest, None)
        if value is None or not isinstance(value, (str, os.PathLike)):
            continue
        if str(value).strip() == "":
            raise HeadscopeError(f"{flag} is empty; give a file path")
        path = Path(value)
        ranking = dest == "scores" or (dest == "out" and args.command in ("score", "merge")
                                       and getattr(args, "shard", None) is None)
        if ranking:
            found += [(f"{flag} {path}", path, "ranking"),
                      (f"the sidecar of {flag} {path}", sidecar_path(path), "sidecar")]
        elif dest == "export_out":
            files = [path / DUO_TSV, path / "config.json"] if args.fmt == "duo" else [path]
            found += [(f"{flag} {path}", f, "file") for f in files]
            found.append((f"the provenance sidecar of {flag} {path}", sidecar_of(path), "file"))
        else:
            found.append((f"{flag} {path}", path, "file"))
    return found


def inputs(args) -> list[tuple[str, Path]]:
    """(label, path) of every input file the command reads (a ranking CSV's sidecar included, and
    the files of a local --model folder)."""
    named = dict(INPUT_FLAGS)
    if args.command == "inject":
        named["task"] = "--task"  # inject fit's --task is a task file, score/eval's a task name
    for _, flag in edit_flags.flags():
        if flag.takes in ("file", "heads"):
            named[flag.dest] = "--" + flag.name
    named["decore"] = "--decore"
    found = []
    for dest, flag in named.items():
        value = getattr(args, dest, None)
        if value is None or isinstance(value, bool):
            continue
        for item in value if isinstance(value, list) else [value]:
            if not isinstance(item, (str, os.PathLike)):
                continue  # e.g. inject fit's --prompts N
            if str(item).strip() == "":
                if dest in _heads_dests():  # --ablate with --heads NAMES: no ranking CSV
                    continue
                raise HeadscopeError(f"{flag} is empty; give a file path" if flag.startswith("--")
                                     else "a file argument is empty; give a file path")
            path = Path(item)
            label = f"input {flag} {path}" if flag.startswith("--") else f"input {path}"
            found.append((label, path))
            if path.suffix.lower() == ".csv":
                found.append((f"the sidecar of {label}", sidecar_path(path)))
    model = getattr(args, "model", None)
    if isinstance(model, str) and model and Path(model).is_dir():  # a local model folder: its files
        found += [(f"{f.name} of the --model folder {model}", f) for f in sorted(Path(model).iterdir()) if f.is_file()]
    return found


def _heads_dests() -> set[str]:
    return {flag.dest for _, flag in edit_flags.heads_flags()} | {"decore"}


def _key(path: Path):
    """What makes two paths one file: the inode when it exists, else the resolved path."""
    try:
        info = path.stat()
        return ("inode", info.st_dev, info.st_ino)
    except OSError:
        return ("path", os.path.realpath(path))


def check_name_length(path: Path, label: str) -> None:
    """Fail before the run if the file's name, or the temp file it is written through, is too long."""
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    for part in path.parts:
        if len(os.fsencode(part)) > limit:
            raise HeadscopeError(f"{label}: the name {part[:40]!r}... is {len(os.fsencode(part))} bytes; this file "
                                 f"system allows {limit}: use a shorter name")
    longest = len(os.fsencode(temp_name(path.name)))
    if longest > limit:
        raise HeadscopeError(f"{label}: the name is {len(os.fsencode(path.name))} bytes and is written through a temp "
                             f"file of {longest} bytes; this file system allows {limit}: use a name of at most "
                             f"{limit - longest + len(os.fsencode(path.name))} bytes")


def _is_ranking_sidecar(path: Path) -> bool:
    """Whether ``path`` is a ranking's sidecar (a JSON object with its CSV's hash or shape)."""
    try:
        if path.stat().st_size > 16 * 2**20:
            return False
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and ("csv_sha256" in data or {"method", "shape"} <= set(data))


def _check_existing(label: str, path: Path, ranking_sidecar: bool) -> None:
    """Files written earlier by other commands that this output would ruin."""
    if not path.is_file():
        return
    if ranking_sidecar and not _is_ranking_sidecar(path):
        raise HeadscopeError(f"{label} ({path}) exists and is not a ranking sidecar; writing it would replace that "
                             "file: move it, or name the ranking otherwise")
    if not ranking_sidecar and path.suffix.lower() == ".json" and path.with_suffix(".csv").is_file() \
            and _is_ranking_sidecar(path):
        raise HeadscopeError(f"{label} ({path}) is the sidecar of the ranking {path.with_suffix('.csv')}; writing it "
                             "would orphan that ranking: choose another name")


def check(args) -> None:
    """Every output path checked against the other outputs, every input and the file system."""
    outs = outputs(args)
    ins = inputs(args)
    seen: dict = {}
    for label, path, _ in outs:
        key = _key(path)
        if key in seen:
            raise HeadscopeError(f"{seen[key]} and {label} are the same file ({path}); give them different names")
        seen[key] = label
    for label, path in ins:
        if _key(path) in seen:
            raise HeadscopeError(f"{seen[_key(path)]} is also {label}: writing it would overwrite the input; write to "
                                 "another path")
    for label, path, role in outs:
        check_name_length(path, label)
        if role == "ranking":
            check_ranking_path(path)
            if path.suffix.lower() != ".csv":
                raise HeadscopeError(f"{label}: name the ranking *.csv (it is read back by its name; its sidecar "
                                     f"is {sidecar_path(path).name}), e.g. {path.with_suffix('.csv')}")
        else:
            check_output(path, label)
        _check_existing(label, path, ranking_sidecar=role == "sidecar")
