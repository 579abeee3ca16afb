"""Shared by the notebook generators (``make_*.py``): cells -> .ipynb, executed when asked.

    python notebooks/make_<name>.py --execute    # with outputs (how they are committed)

Executed notebooks keep their outputs: headscope's heatmaps carry a static SVG beside the plotly
JSON, so GitHub (which drops plotly's scripts) still shows them. CI executes every notebook again
(tests/test_notebooks.py), so none can rot.
"""

import sys
import tempfile
from pathlib import Path

import nbformat as nbf


def write(cells: list[tuple[str, str]], name: str) -> Path:
    """Write ``cells`` ((``"md"`` | ``"code"``, source) pairs) to notebooks/``name``; executed in a
    temporary folder first when ``--execute`` is on the command line."""
    nb = nbf.v4.new_notebook()
    nb.cells = [nbf.v4.new_markdown_cell(src) if kind == "md" else nbf.v4.new_code_cell(src) for kind, src in cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    if "--execute" in sys.argv:
        import nbclient

        with tempfile.TemporaryDirectory() as folder:
            nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                    resources={"metadata": {"path": folder}}).execute()
    path = Path(__file__).with_name(name)
    nbf.write(nb, path)
    return path
