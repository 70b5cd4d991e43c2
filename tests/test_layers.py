"""The library's subpackages are layers: each imports only the layers below it (function-level imports included),
so the structure drawn from the imports is the one the README's "Code layout" shows."""

from __future__ import annotations

import ast
from pathlib import Path

DMD = Path(__file__).resolve().parents[1] / "dmd"

# lowest first; packages on one line are peers and never import each other
LAYERS = [
    {"core"},
    {"wan"},
    {"toy"},
    {"data", "distill"},
    {"student"},
    {"training", "evaluation"},
]
RANK = {package: rank for rank, layer in enumerate(LAYERS) for package in layer}


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {m for m in found if m.startswith("dmd.")}


def package_of(path: Path) -> str:
    return path.relative_to(DMD).parts[0]


def test_every_subpackage_has_a_layer():
    packages = {p.name for p in DMD.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages == set(RANK), (
        f"add {sorted(packages - set(RANK))} to LAYERS or remove {sorted(set(RANK) - packages)}"
    )


def test_imports_point_down_only():
    upward = []
    for path in DMD.rglob("*.py"):
        if path.parent == DMD:
            continue
        source = package_of(path)
        for module in imported_modules(path):
            target = module.split(".")[1]
            if target != source and RANK[target] >= RANK[source]:
                upward.append(f"{path.relative_to(DMD.parent)} imports {module}")
    assert not upward, "imports that do not point down a layer:\n" + "\n".join(sorted(upward))


def test_training_reads_the_cache_but_never_builds_it():
    """The train stage depends on the cache's format and loader, not on how the cache is built."""
    builders = [
        f"{path.relative_to(DMD.parent)} imports {module}"
        for path in (DMD / "training").rglob("*.py")
        for module in imported_modules(path)
        if module.startswith("dmd.data.cache.build")
    ]
    assert not builders, builders
