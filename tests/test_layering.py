"""Layering: stages never import graphs; only the API and the CLI, which sit above both, do."""

from __future__ import annotations

import ast
from pathlib import Path

PIPELINE = Path(__file__).resolve().parents[1] / "pipeline"
#: the modules above both layers (README "How it works")
ABOVE_BOTH = {"api.py", "cli.py", "__main__.py"}


def graphs_imports(source: str) -> list[str]:
    """``graphs`` modules that ``source`` imports, at any depth (in functions too), by an
    import statement or ``importlib.import_module("graphs…")``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names = [node.args[0].value]
        else:
            continue
        found += [f"line {node.lineno}: {name}" for name in names
                  if name == "graphs" or name.startswith("graphs.")]
    return found


def test_stages_never_import_graphs() -> None:
    offenders = {}
    for path in sorted(PIPELINE.rglob("*.py")):
        relative = path.relative_to(PIPELINE)
        if str(relative) in ABOVE_BOTH:
            continue
        imports = graphs_imports(path.read_text())
        if imports:
            offenders[f"pipeline/{relative}"] = imports
    assert not offenders, f"stages import graphs: {offenders}"


def test_the_check_sees_every_form_of_import() -> None:
    source = ("import graphs\nfrom graphs.image_job import run_job\n"
              "def f():\n    import graphs.cluster as c\n    importlib.import_module('graphs.tile_job')\n"
              "import graphsx\nfrom pipeline import graphs_like\n")
    assert graphs_imports(source) == ["line 1: graphs", "line 2: graphs.image_job",
                                      "line 4: graphs.cluster", "line 5: graphs.tile_job"]
    assert graphs_imports((PIPELINE / "api.py").read_text())  # the API does import graphs
