"""Docstrings cite docs/METHODS.md, which exists and names each section they cite."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_method_notes_cited_by_docstrings_exist():
    notes = (ROOT / "docs" / "METHODS.md").read_text(encoding="utf-8")
    citing = 0
    for path in [*ROOT.joinpath("headscope").rglob("*.py"), *ROOT.joinpath("kernels").rglob("*.py")]:
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"(\S*)METHODS\.md(?:, \"([^\"]+)\")?", text):
            assert match.group(1).endswith("docs/"), f"{path}: cite docs/METHODS.md, not {match.group(0)!r}"
            if match.group(2):
                assert match.group(2) in notes, f"{path} cites section {match.group(2)!r}, not in docs/METHODS.md"
            citing += 1
    assert citing >= 3
