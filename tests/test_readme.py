"""Every ```python and ```bash block of README.md runs as written: offline, in a fresh temporary
folder (with the repository's datasets/ linked in), on the shipped organisms. A block directly
preceded by the line ``<!-- readme-test: skip (reason) -->`` is not run (hub ids, GPUs, long runs).

Each block must stand alone. Bash blocks run with ``bash -e``; their ``headscope`` is this
checkout's CLI. Both the CLI commands and the python blocks run in fresh forks of one process that
imported torch and transformers once (tests/readme_forkserver.py), as ``headscope ...`` and
``python block.py`` would run them, without paying the imports each time.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from readme_forkserver import CLIENT, RUN_PYTHON  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\s*$")
SKIP = re.compile(r"^<!-- readme-test: skip \((.+)\) -->$")
TIMEOUT = 600


def readme_blocks(text: str) -> list[dict]:
    """The fenced blocks: language, first line number, code, and the skip reason if marked."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        start = i
        i += 1
        while i < len(lines) and not FENCE.match(lines[i]):
            i += 1
        skip = SKIP.match(lines[start - 1].strip()) if start > 0 else None
        blocks.append({"lang": opening.group(1), "line": start + 1, "code": "\n".join(lines[start + 1 : i]) + "\n",
                       "skip": skip.group(1) if skip else None})
        i += 1
    return blocks


BLOCKS = [b for b in readme_blocks(README.read_text(encoding="utf-8")) if b["lang"] in ("python", "bash")]


def test_readme_block_parser():
    text = "x\n<!-- readme-test: skip (needs a GPU) -->\n```bash\nnvidia-smi\n```\n\n```python\nprint(1)\n```\n"
    blocks = readme_blocks(text)
    assert [(b["lang"], b["line"], b["skip"]) for b in blocks] == [("bash", 3, "needs a GPU"), ("python", 7, None)]
    assert blocks[1]["code"] == "print(1)\n"


def test_readme_blocks_mostly_run():
    run = [b for b in BLOCKS if b["skip"] is None]
    assert len(run) >= 5 and len(run) >= 2 * (len(BLOCKS) - len(run)), \
        f"{len(run)} of {len(BLOCKS)} README blocks run; skip only what cannot run here"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A temporary folder with datasets/ linked in; PATH leads to this checkout's CLI and this Python."""
    root = tmp_path_factory.mktemp("readme")
    (root / "datasets").symlink_to(ROOT / "datasets")
    bin_dir = root / ".bin"
    bin_dir.mkdir()
    sock = tmp_path_factory.mktemp("sock") / "s"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MPLBACKEND": "Agg",
           "PYTHONPATH": os.pathsep.join([str(ROOT)] + [p for p in sys.path if p and "site-packages" not in p])}
    server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "readme_forkserver.py"), str(sock)],
                              stdout=subprocess.PIPE, text=True, env=env, cwd=root)
    assert server.stdout.readline().strip() == "ready"
    shim = bin_dir / "headscope"
    shim.write_text(CLIENT.format(python=sys.executable, path=str(sock)))
    shim.chmod(0o755)
    env["PATH"] = os.pathsep.join([str(bin_dir), os.path.dirname(sys.executable), env["PATH"]])  # this venv's python
    yield root, env
    server.kill()
    server.wait()


@pytest.mark.parametrize("block", BLOCKS, ids=[f"{b['lang']}-line{b['line']}" for b in BLOCKS])
def test_readme_block_runs(block, workdir):
    if block["skip"]:
        pytest.skip(f"README line {block['line']}: {block['skip']}")
    root, env = workdir
    script = root / f"block_{block['line']}.{'py' if block['lang'] == 'python' else 'sh'}"
    script.write_text(block["code"], encoding="utf-8")
    if block["lang"] == "python":
        command = [str(root / ".bin" / "headscope"), RUN_PYTHON, script.name]
    else:
        command = ["bash", "-e", "-o", "pipefail", script.name]
    start = time.time()
    run = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert run.returncode == 0, (f"README block at line {block['line']} failed (exit {run.returncode}, "
                                 f"{time.time() - start:.0f} s):\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
