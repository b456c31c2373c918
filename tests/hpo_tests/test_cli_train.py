"""`hpo train` and `hpo diagnose` through the real console entry point, in subprocesses."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest


def hpo(*args: str, cwd=None, env_extra: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "hpo.cli", *args], check=False,
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def test_diagnose_full_system_reports_the_fixed_scales():
    result = hpo("diagnose", "--preset", "full", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["n_elements"] == 144
    for key in ("R_true", "R_samp", "R_blend", "R_pred"):
        assert report[key]["trace"] == pytest.approx(144, rel=0.01), key
    # The fixes do work: unscaled, R_true is far above N and R_samp far below it.
    assert report["R_true_unscaled"]["trace"] > 10 * 144
    assert report["R_samp_unscaled"]["trace"] < 144 / 10
    assert report["nmse_true_vs_true"] == 0.0
    assert 0.0 < report["nmse_blend_vs_true"] < 10.0
    assert report["loss_terms_finite"] and report["gradients_finite"]
    assert report["eigengap_enabled"] is False
    assert report["eigengap_gradients_finite"] is True
    assert all(math.isfinite(v) for v in report["loss_terms"].values())


def test_diagnose_prints_a_table():
    result = hpo("diagnose", "--preset", "smoke")
    assert result.returncode == 0, result.stderr
    assert "R_blend [fix 2]" in result.stdout and "NMSE(R_true, R_true)  = 0" in result.stdout


def test_train_smoke_json_has_finite_metrics_and_a_checkpoint(tmp_path):
    result = hpo("train", "--preset", "smoke", "--json", "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["final"]["epoch"] == 2 and summary["best"]["epoch"] in (1, 2)
    numbers = [v for k, v in summary["final"].items() if isinstance(v, float)]
    numbers += list(summary["final"]["train_terms"].values())
    assert numbers and all(math.isfinite(v) for v in numbers)
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    assert (tmp_path / "run" / "best.pt").is_file()  # hpo train keeps its best epoch too
    assert summary["config"]["n_ris_rows"] == 6
    assert "R_samp (MDL K)" in summary["references"]
    # One progress line per epoch goes to stderr when stdout carries the JSON.
    assert result.stderr.count("epoch ") == 2


def test_train_prints_one_line_per_epoch(tmp_path):
    result = hpo("train", "--preset", "smoke", "--epochs", "3", "--no-references",
                 "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("epoch")]
    assert len(lines) == 3
    for fragment in ("loss", "val nmse", "K acc", "rmse az", "success", "score", "lr", " s"):
        assert fragment in lines[0]


@pytest.mark.parametrize("args, fragment", [
    (("train", "--preset", "huge"), "unknown preset 'huge'"),
    (("train", "--preset", "smoke", "--set", "nope=1"), "unknown config field 'nope'"),
    (("train", "--preset", "smoke", "--set", "beta=2"), "beta must be in [0, 1]"),
    (("train", "--preset", "smoke", "--set", "lr"), "field=value"),
    (("train", "--preset", "smoke", "--device", "cuda"), "CUDA is not available"),
    (("train", "--preset", "smoke", "--device", "tpu"), "'--device': 'tpu' is not one of 'auto', 'cpu', 'cuda'"),
    (("diagnose", "--preset", "nope"), "unknown preset 'nope'"),
])
def test_bad_input_is_one_line_exit_2_no_traceback(args, fragment, tmp_path):
    result = hpo(*args, "--out", str(tmp_path / "r")) if args[0] == "train" else hpo(*args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert fragment in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "r").exists()  # nothing half-made


def test_an_unwritable_out_is_one_line_before_any_training(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = hpo("train", "--preset", "smoke", "--out", str(blocker / "run"))
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"error: cannot write to output directory {blocker / 'run'}: Not a directory"]
    assert "training" not in result.stdout  # refused before the run started
