"""Edits and Ships scoring that run on NDIF: nnsight's remote="local" simulation in a subprocess
where headscope cannot be imported while the request is deserialised (an NDIF server's situation).
z-edits (zero, scale, mean, patch) equal headscope's own hooks; Ships KL per head (query and
output ablation) equals headscope's ships_per_query; and a control that calls headscope inside the
trace fails there, which shows the import block bites."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("nnsight")


def test_edits_and_ships_run_without_headscope_on_the_server():
    script = Path(__file__).parent / "remote" / "server_side.py"
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["deserialised"] == 6 and result["blocked_before_control"] == []
    for name, (diff, effect) in result["edits"].items():
        assert diff < 1e-5 and effect > 1e-3, (name, diff, effect)
    for ablation, (diff, largest) in result["ships"].items():
        assert largest > 0 and diff <= 1e-4 * largest, (ablation, diff, largest)
    assert result["control"].startswith("ImportError") and "headscope" in result["blocked"]
