"""The repository's own layout never hides an installed distribution.

Run from the repository root, ``python -m ...`` and an interactive ``python`` put the root first on
``sys.path``: a top-level folder or module named like an installed distribution's import name would
shadow it (a top-level ``kernels/`` package once hid Hugging Face's ``kernels``, which transformers
imports, and broke ``import headscope``).
"""

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def importable_top_level_names(root):
    """Names Python could import from ``root``: packages (folders with ``__init__.py``), modules
    (``*.py``) and folders that would become namespace packages (any other folder with a valid
    identifier as its name)."""
    names = {}
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir() and entry.name.isidentifier():
            names[entry.name] = "package" if (entry / "__init__.py").exists() else "namespace folder"
        elif entry.suffix == ".py" and entry.stem.isidentifier():
            names[entry.stem] = "module"
    return names


def test_no_top_level_package_or_module_shadows_a_distribution():
    """A regular package or module at the root wins over site-packages: none may share a name with
    an installed distribution (the headscope package itself excepted)."""
    distributions = importlib.metadata.packages_distributions()
    clashes = [f"{name}/ ({kind}) shadows the installed distribution {distributions[name][0]}"
               for name, kind in importable_top_level_names(ROOT).items()
               if kind != "namespace folder" and name in distributions and name != "headscope"]
    assert not clashes, "; ".join(clashes)


def test_top_level_folders_resolve_to_the_installed_distributions_from_the_root():
    """A folder without ``__init__.py`` yields to an installed regular package of the same name: check
    what Python actually imports from the root for every root name that a distribution also uses."""
    distributions = importlib.metadata.packages_distributions()
    shared = sorted(n for n in importable_top_level_names(ROOT) if n in distributions and n != "headscope")
    if not shared:
        pytest.skip("no root name is also an installed distribution's import name")
    code = ("import importlib.util, sys\n"
            "for name in sys.argv[1:]:\n"
            "    spec = importlib.util.find_spec(name)\n"
            "    print(name, spec.origin if spec.origin else list(spec.submodule_search_locations))\n")
    done = subprocess.run([sys.executable, "-c", code, *shared], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr
    inside = [line for line in done.stdout.splitlines() if str(ROOT) + os.sep in line.split(" ", 1)[1]
              and ".venv" not in line]
    assert not inside, f"imported from the repository instead of the installed distribution: {inside}"


def test_headscope_imports_and_runs_from_the_repository_root():
    """What a user does first after cloning: ``import headscope`` and the CLI, from the root, with
    Hugging Face's ``kernels`` installed (transformers >= 5.25 imports it)."""
    if importlib.util.find_spec("kernels") is None:
        pytest.skip("Hugging Face's kernels is not installed (transformers < 5.25 does not need it)")
    env = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", "import headscope, kernels; print(kernels.__file__)"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not done.stdout.strip().startswith(str(ROOT / "kernels")), done.stdout
    models = subprocess.run([sys.executable, "-m", "headscope.cli", "models"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env=env)
    assert models.returncode == 0, models.stderr[-2000:]
    assert "retrieval" in models.stdout and "icl" in models.stdout and "vision" in models.stdout
