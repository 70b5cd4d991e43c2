"""The distribution declares what the code imports and nothing it does not; it carries its licence and py.typed."""

from __future__ import annotations

import ast
import re
from importlib.metadata import packages_distributions
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest brings tomli there
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
CODE = ("dmd", "flows", "benchmarks", "scripts")
# Declared, used, but never imported by name.
RUNTIME_ONLY = {
    "sentencepiece": "transformers needs it to load UMT5's sentencepiece tokenizer of a real Wan directory",
}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def _imported_distributions() -> set[str]:
    modules = set()
    for folder in CODE:
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    modules |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules.add(node.module.split(".")[0])
    owners = packages_distributions()
    return {_name(d) for m in modules for d in owners.get(m, [])} - {"dmd-pipeline"}


def test_dependencies_are_exactly_what_the_code_imports():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {_name(d) for d in project["dependencies"]}
    imported = _imported_distributions()
    assert not imported - declared, f"imported but not declared: {sorted(imported - declared)}"
    unused = declared - imported - set(RUNTIME_ONLY)
    assert not unused, (
        f"declared but never imported (drop them, or say in RUNTIME_ONLY why): {sorted(unused)}"
    )


def test_licence_and_type_marker_ship():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["license"] == {"text": "Apache-2.0"}
    assert (REPO / "LICENSE").read_text().lstrip().startswith("Apache License")
    assert "Version 2.0" in (REPO / "LICENSE").read_text()[:200]
    assert (REPO / "dmd" / "py.typed").is_file()
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["dmd"]


def test_the_wheel_lists_every_package_and_installs_the_flows_under_the_project_name():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "dmd").rglob("__init__.py")}
    listed = set(setuptools["packages"])
    assert not on_disk - listed, f"add to pyproject.toml's packages: {sorted(on_disk - listed)}"
    assert setuptools["package-dir"] == {"dmd_pipeline.flows": "flows"}
    assert {p.split(".")[0] for p in listed} == {"dmd", "dmd_pipeline"}  # no generic top-level names
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"dmd": "dmd_pipeline.flows.cli:main"}
