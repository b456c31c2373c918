"""pipeline knows nothing of Optuna, SQL, the CLI, hpo or storage: checked on every module's
imports as written (function-level imports too) and in a fresh interpreter that loads them all."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pipeline

FORBIDDEN = ("optuna", "sqlalchemy", "typer", "psycopg2", "hpo", "storage")
PACKAGE = Path(pipeline.__file__).parent


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_no_pipeline_module_names_a_forbidden_package():
    modules = sorted(PACKAGE.glob("*.py"))
    assert len(modules) > 10  # the walk found the package
    offenders = {
        path.name: sorted(_imported_roots(path) & set(FORBIDDEN)) for path in modules
    }
    assert {name: found for name, found in offenders.items() if found} == {}


def test_loading_every_pipeline_module_loads_none_of_them():
    code = (
        "import importlib, pkgutil, sys, pipeline\n"
        "for info in pkgutil.iter_modules(pipeline.__path__):\n"
        "    importlib.import_module(f'pipeline.{info.name}')\n"
        f"print(sorted(m for m in {FORBIDDEN!r} if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
