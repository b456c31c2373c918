"""bench/gpu.sh is run by whoever is lent a GPU, with minutes to spare: its SMOKE mode runs every
step on the CPU at toy sizes, so a broken flag or summary shows up here instead of there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_every_step_of_the_gpu_script_runs_in_smoke_mode(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "SMOKE": "1", "OUT": str(out),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    logs = ROOT / "runs" / "hpo-gpu-bench"  # where step 6's logs went before it ran inside OUT
    there_before = logs.exists()
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh")], env=env, cwd=tmp_path,
                          check=False, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    generation = _json_lines(out / "generation.jsonl")
    assert generation and generation[0]["scenes"] == 256
    assert {r["preset"] for r in _json_lines(out / "train_throughput.jsonl")} == {"smoke", "quick"}
    assert "| trial" in (out / "trial_profile.txt").read_text()
    assert _json_lines(out / "localize.jsonl")[-1]["met"] in (True, False)
    trial = json.loads((out / "full-trial-summary.json").read_text())
    assert trial["epochs"] == 2 and trial["trial_s"] > 0
    run = json.loads((out / "run-summary.json").read_text())
    assert run["trials"] == 2 and run["gpu_busy_mean_pct"] is None  # no nvidia-smi on the CPU
    assert "2/2 finished" in (out / "run.txt").read_text()
    # everything the study wrote stays under OUT, nothing in the checkout or the caller's cwd
    assert (out / "runs" / "hpo-gpu-bench").is_dir()
    assert logs.exists() == there_before
    assert not (tmp_path / "runs").exists()
