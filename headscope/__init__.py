"""headscope: find what attention heads do, then change what they do while the model generates."""

from headscope import progress  # noqa: F401  first: quiets tqdm.auto's notebook warning (headscope/progress.py)
from headscope.analyzers.retrieval import accuracy_heatmap, needle_accuracy, retrieval_heads
from headscope.errors import HeadscopeError
from headscope.model import HeadGeometry, HeadModel
from headscope.scores import HeadScores
from headscope.tasks.needle import Needle, NeedleTask, load_needles

__all__ = [
    "HeadModel", "HeadGeometry", "HeadScores", "HeadscopeError",
    "NeedleTask", "Needle", "load_needles", "retrieval_heads", "needle_accuracy", "accuracy_heatmap",
]
__version__ = "0.1.0"
