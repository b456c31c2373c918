"""Optuna's private API is used in one module only, storage/_optuna.py, which checks the version.

Every Python file of the packages and the benchmarks is read (not imported) and each use of a
private Optuna name is reported: an import of a private module or name from `optuna`, or a read
of an attribute that is private to Optuna's study, trial or storage classes on anything but
`self`/`cls`. The scanner is tested on code that does each of these, so it cannot pass by
finding nothing.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest

import storage

ROOT = Path(__file__).resolve().parents[2]
FENCE = ROOT / "storage" / "_optuna.py"
SCANNED = ("hpo", "pipeline", "storage", "bench")


def _optuna_private_attributes() -> frozenset[str]:
    """Private attribute names of Optuna's study, trial and storage objects (their classes'
    and their instances'), read off real ones."""
    from optuna.storages import RDBStorage, _CachedStorage
    from optuna.trial import FrozenTrial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage())
    trial = study.ask()
    names: set[str] = set()
    for thing in (optuna.Study, optuna.Trial, FrozenTrial, RDBStorage, _CachedStorage, study,
                  trial, trial._cached_frozen_trial):  # fmt: skip
        names |= {n for n in dir(thing) if n.startswith("_") and not n.startswith("__")}
        names |= {n for n in getattr(thing, "__dict__", {}) if n.startswith("_")
                  and not n.startswith("__")}  # fmt: skip
    return frozenset(names)


PRIVATE = _optuna_private_attributes()


def private_uses(source: str) -> list[str]:
    """Each use of a private Optuna name in `source`, as 'line: what'."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "optuna" and any(p.startswith("_") for p in parts):
                    found.append(f"{node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            parts = node.module.split(".")
            if parts[0] != "optuna":
                continue
            private = [a.name for a in node.names if a.name.startswith("_")]
            if any(p.startswith("_") for p in parts) or private:
                found.append(f"{node.lineno}: from {node.module} import "
                             + ", ".join(a.name for a in node.names))  # fmt: skip
        elif isinstance(node, ast.Attribute) and node.attr in PRIVATE:
            owner = node.value
            if not (isinstance(owner, ast.Name) and owner.id in ("self", "cls")):
                found.append(f"{node.lineno}: .{node.attr}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "hasattr", "setattr") and len(node.args) >= 2
              and isinstance(node.args[1], ast.Constant) and node.args[1].value in PRIVATE):
            found.append(f"{node.lineno}: {node.func.id}(..., {node.args[1].value!r})")
    return found


def test_the_scanner_finds_each_kind_of_private_use():
    code = textwrap.dedent(
        """
        import optuna.storages._rdb.models
        from optuna.storages._rdb import models
        from optuna.storages import _CachedStorage
        from optuna.storages._rdb.storage import _create_scoped_session
        def f(trial, study, rdb):
            trial._trial_id, study._storage, study._study_id
            trial._cached_frozen_trial.user_attrs
            rdb._get_stale_trial_ids(1)
            getattr(study, "_storage")
        class Mine:
            def g(self):
                return self._storage  # its own attribute: fine
        import optuna
        from optuna.trial import TrialState  # public: fine
        """
    )
    found = private_uses(code)
    assert len(found) == 10, found
    assert not any("self" in what or "TrialState" in what for what in found)


def test_only_the_fenced_module_uses_optunas_private_api():
    files = [p for name in SCANNED for p in sorted((ROOT / name).rglob("*.py"))]
    assert len(files) > 50  # the packages and benchmarks were found
    offenders = {
        str(path.relative_to(ROOT)): uses
        for path in files
        if path != FENCE and (uses := private_uses(path.read_text()))
    }
    assert offenders == {}
    assert private_uses(FENCE.read_text())  # ...and the fence is where they went


def test_the_fence_trusts_only_the_optuna_it_was_tested_on():
    assert storage.PRIVATE_WRITES
    assert ".".join(optuna.__version__.split(".")[:2]) in storage.TESTED_OPTUNA


@pytest.mark.parametrize("version", ["5.1.0", "4.9.2"])
def test_an_untested_optuna_falls_back_to_public_writes_or_fails_loudly(tmp_path, version):
    # In a fresh interpreter that sees another Optuna version: the grouped writes go through
    # Optuna's public methods (and still land), and the private accessors raise StorageError.
    code = textwrap.dedent(
        f"""
        import optuna, warnings
        optuna.__version__ = {version!r}
        warnings.simplefilter("ignore")
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        import storage
        from storage import StorageError, report_epoch, set_user_attrs, trial_id
        assert not storage.PRIVATE_WRITES
        study = optuna.create_study(storage=storage.open_storage("sqlite:///{tmp_path}/f.db"))
        trial = study.ask()
        set_user_attrs(trial, {{"a": 1, "b": 2}})
        report_epoch(trial, 0.5, 1, {{"c": 3}})
        stored = study.get_trials()[0]
        assert stored.user_attrs == {{"a": 1, "b": 2, "c": 3}}, stored.user_attrs
        assert stored.intermediate_values == {{1: 0.5}}
        try:
            trial_id(object())
        except StorageError as e:
            print("refused:", e)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"Optuna {version} (hpo was tested on 5.0)" in result.stdout
