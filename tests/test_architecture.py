"""The package's import graph, drawn from the source (ast): no import cycles among headscope modules
(headscope_kernels included), imports inside functions only of optional packages, and the floors of
the house (docs: the README's design section) printed with every import that runs against them.

Both module-level and function-level imports count as edges.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"headscope": ROOT / "headscope", "headscope_kernels": ROOT / "kernels" / "headscope_kernels"}

# Imports allowed inside functions: optional dependencies (extras "interop" and "triton", IPython in a
# notebook) ...
OPTIONAL = ("transformer_lens", "nnsight", "triton", "IPython", "headscope_kernels.triton_attention")
# ... and measured import-time savings: (module, imported module) -> the measurement.
LAZY_FOR_IMPORT_TIME = {
    ("headscope.scores", "scipy.stats"): "1.5 s of import time (python -X importtime, load ~9); only compare() needs it",
    ("headscope.controls", "scipy.stats"): "the same scipy.stats import as scores' (1.5 s); only bootstrap_interval "
                                           "needs it, and headscope eval imports controls",
}

# The floors, lowest first: a module imports only from its own group or from lower floors. Groups on
# one floor are siblings and do not import each other.
FLOORS: list[dict[str, tuple[str, ...]]] = [
    {"base": ("headscope.errors", "headscope.io", "headscope.controls", "headscope.heads", "headscope.organisms", "headscope.progress",
              "headscope.published", "headscope.provenance",
              "headscope.scope",  # where an open probe or edit applies (contextvars), under the model
              "headscope.validate", "headscope.data", "headscope.plots", "headscope.remote", "headscope_kernels")},
    {"hf / results": ("headscope.hf", "headscope.scores"),
     # the two registries import only errors: sharding (below the analyzers) looks up joins in one
     "registries": ("headscope.analyzers.registry", "headscope.interventions.registry")},
    {"model": ("headscope.probes", "headscope.cache", "headscope.model")},
    {"inputs and tasks": ("headscope.vision", "headscope.tasks")},
    {"sharding": ("headscope.sharding",)},
    {"analyzers": ("headscope.analyzers",)},
    {"interventions": ("headscope.interventions",)},  # edits take HeadScores and analyzers' selections
    {"methods": ("headscope.methods", "headscope.interop", "headscope.formats")},  # formats: exchange files, as interop
    {"zoo": ("headscope.zoo",)},
    {"cli": ("headscope.cli",)},
    {"public face": ("headscope",)},
]



def modules() -> dict[str, Path]:
    out = {}
    for package, base in PACKAGES.items():
        for path in sorted(base.rglob("*.py")):
            parts = [package, *path.relative_to(base).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, bool, int]]:
    """(imported module, inside a function?, line) for every import statement of one module."""
    tree = ast.parse(path.read_text(), str(path))
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((alias.name, inside, child.lineno) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package[: len(package) - (child.level - 1)]
                    source = ".".join(base + ([child.module] if child.module else []))
                else:
                    source = child.module
                for alias in child.names:  # `from pkg import module` imports the module
                    full = f"{source}.{alias.name}"
                    found.append((full if full in known else source, inside, child.lineno))
            visit(child, inside)

    visit(tree, False)
    return found


def internal(target: str, known: dict[str, Path]) -> str | None:
    """The headscope module an import names (a name inside a module resolves to the module)."""
    while target and target not in known:
        target = target.rpartition(".")[0]
    return target or None


def graph() -> tuple[dict[str, set[str]], list[tuple[str, str, int]]]:
    """Edges between headscope modules, and every function-level import (module, target, line)."""
    known = modules()
    edges: dict[str, set[str]] = {name: set() for name in known}
    in_functions = []
    for name, path in known.items():
        for target, inside, line in imports(name, path, known):
            module = internal(target, known)
            if module is not None and module != name:
                edges[name].add(module)
            if inside:
                in_functions.append((name, target, line))
    return edges, in_functions


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            strongconnect(v)
    return out


def floor_of(module: str) -> tuple[int, str]:
    """(floor number, group) of a module: the group with the longest matching prefix."""
    best = (-1, "", -1)
    for number, groups in enumerate(FLOORS):
        for group, prefixes in groups.items():
            for prefix in prefixes:
                if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best[2]:
                    best = (number, group, len(prefix))
    assert best[0] >= 0, f"{module} sits on no floor: add it to FLOORS in tests/test_architecture.py"
    return best[0], best[1]


def against_layering(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    bad = []
    for source, targets in sorted(edges.items()):
        floor, group = floor_of(source)
        for target in sorted(targets):
            t_floor, t_group = floor_of(target)
            if t_floor > floor or (t_floor == floor and t_group != group):
                bad.append((source, target))
    return bad


def test_the_graph_sees_module_and_function_level_imports():
    """Known truth from this repository: model.py imports hf.attention at the top, interop imports
    nnsight inside a function, and kernels' relative imports resolve."""
    edges, in_functions = graph()
    assert "headscope.hf.attention" in edges["headscope.model"]
    assert any(m == "headscope.interop" and t == "nnsight" for m, t, _ in in_functions)
    assert "headscope_kernels.reference" in edges["headscope_kernels"]
    assert "headscope_kernels.cpu_tile" in edges["headscope_kernels.reference"]


def test_cycle_finder_finds_a_cycle():
    """Negative control for the check below: a hand-made two-module loop is found."""
    assert cycles({"a": {"b"}, "b": {"a", "c"}, "c": set()}) == [["a", "b"]]


def test_no_import_cycles():
    edges, _ = graph()
    found = cycles(edges)
    assert not found, f"import cycles among headscope modules: {found}"


def test_imports_inside_functions_only_of_optional_packages():
    _, in_functions = graph()
    bad = []
    for module, target, line in in_functions:
        optional = any(target == o or target.startswith(o + ".") for o in OPTIONAL)
        if optional or (module, target) in LAZY_FOR_IMPORT_TIME:
            continue
        bad.append(f"{module}:{line} imports {target}")
    assert not bad, "imports inside functions (move them to the top of the module):\n" + "\n".join(bad)


def test_layering(capsys):
    """Prints the floors and every import that runs against them; fails on one outside the known list."""
    edges, _ = graph()
    with capsys.disabled():
        print("\nfloors, lowest first:")
        for number, groups in enumerate(FLOORS):
            print(f"  {number}: " + " | ".join(f"{g}: {', '.join(p)}" for g, p in groups.items()))
        bad = against_layering(edges)
        print(f"imports against the layering: {len(bad)}")
        for source, target in bad:
            print(f"  {source} -> {target}")
    assert not bad, f"imports against the layering: {bad}"


def test_only_the_hf_layer_reaches_into_transformers_and_accelerate_internals():
    """Submodules of transformers / accelerate (internals such as cache_utils, modeling_utils,
    big_modeling) are imported in headscope/hf/ only; elsewhere only their top-level public names
    (model classes and configs for the organism trainers, the logging switch for the CLI)."""
    allowed_elsewhere = {"transformers", "transformers.utils", "accelerate"}
    bad = []
    for name, path in modules().items():
        if name.startswith("headscope.hf") or not name.startswith("headscope"):
            continue
        for target, _, line in imports(name, path, modules()):
            root = target.split(".")[0]
            if root in ("transformers", "accelerate") and target not in allowed_elsewhere:
                bad.append(f"{name}:{line} imports {target}")
    assert not bad, "transformers / accelerate internals outside headscope/hf/:\n" + "\n".join(bad)
