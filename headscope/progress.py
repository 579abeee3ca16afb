"""Progress bars: tqdm's notebook widget where ipywidgets is installed, the plain text bar otherwise.

``tqdm.auto`` picks the widget bar in any notebook and, without ipywidgets, warns "IProgress not
found" in every cell that shows a bar; the text bar renders everywhere (also in a notebook saved to
GitHub). Import ``tqdm`` from here; importing headscope also silences tqdm.auto's "IProgress not
found" warning, which other packages' imports of tqdm.auto would raise.
"""

from __future__ import annotations

import importlib.util
import warnings

if importlib.util.find_spec("ipywidgets") is not None:
    from tqdm.auto import tqdm
else:
    from tqdm.std import tqdm

    # huggingface_hub imports tqdm.auto, which warns on import in a notebook without ipywidgets
    warnings.filterwarnings("ignore", message="IProgress not found", module="tqdm.auto")

__all__ = ["tqdm"]
