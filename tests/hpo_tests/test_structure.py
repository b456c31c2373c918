"""The shape the code keeps: one concept per module, thin commands, one face per package.

Read from the source (nothing is imported but the faces): every module of pipeline, storage and
hpo opens with a docstring whose first line says what it holds; no module of hpo is over
MAX_MODULE_LINES; no typer command body is over MAX_COMMAND_LINES; the benchmarks reach hpo only
through its face; and every name a face lists can be imported.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAX_MODULE_LINES = 360  # "about 350"
MAX_COMMAND_LINES = 60  # a command's body after its docstring


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).glob("*.py"))


@pytest.mark.parametrize("package", ["pipeline", "storage", "hpo"])
def test_every_module_says_what_it_holds_in_its_first_line(package):
    missing = []
    for path in _modules(package):
        doc = ast.get_docstring(ast.parse(path.read_text()))
        first = (doc or "").splitlines()[0] if doc else ""
        if not first or len(first) > 99:
            missing.append(path.name)
    assert missing == []


def test_no_hpo_module_is_over_the_size_of_one_concept():
    sizes = {p.name: len(p.read_text().splitlines()) for p in _modules("hpo")}
    assert len(sizes) > 20
    assert {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES} == {}


def test_every_command_is_thin():
    bodies = {}
    for path in _modules("hpo"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and any(
                "command" in ast.unparse(d) for d in node.decorator_list
            ):
                body = node.body
                docstring = isinstance(body[0], ast.Expr) and isinstance(
                    body[0].value, ast.Constant)  # fmt: skip
                start = body[1].lineno if docstring else body[0].lineno
                bodies[node.name] = node.end_lineno - start + 1
    assert {"run", "status", "best", "train", "evaluate", "report", "dashboard"} <= set(bodies)
    assert {name: n for name, n in bodies.items() if n > MAX_COMMAND_LINES} == {}


def test_the_benchmarks_use_hpo_only_through_its_face():
    reaching_in = []
    for path in sorted((ROOT / "bench").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [node.module or ""] if isinstance(node, ast.ImportFrom)
                else [a.name for a in node.names] if isinstance(node, ast.Import) else []
            )  # fmt: skip
            for name in names:
                if name.startswith("hpo.") and name not in ("hpo.testing", "hpo.cli"):
                    reaching_in.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
                if name.startswith("tests"):
                    reaching_in.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
    assert reaching_in == []


@pytest.mark.parametrize("package", ["pipeline", "storage", "hpo"])
def test_every_name_on_a_face_imports(package):
    face = importlib.import_module(package)
    assert face.__all__
    for name in face.__all__:
        assert getattr(face, name) is not None, name
