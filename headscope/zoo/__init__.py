"""Model organisms: tiny models trained by the project's own scripts, shipped with their weights,
tokenizer and a measured ground truth, so analyzers can be checked against a known answer.

The catalogue (names, folders, example prompts) is :mod:`headscope.organisms`; this package holds
the organisms' folders and their trainers.
"""

from __future__ import annotations

from headscope.organisms import (  # the catalogue, under the names the zoo always had
    DEFAULT_MODEL,
    EXAMPLE_IMAGES,
    EXAMPLE_PROMPTS,
    ORGANISMS,
    ZOO_DIR,
    ground_truth_path,
    organism_info,
    organism_path,
)

__all__ = ["DEFAULT_MODEL", "EXAMPLE_IMAGES", "EXAMPLE_PROMPTS", "ORGANISMS", "ZOO_DIR", "ground_truth_path", "organism_info",
           "organism_path"]
