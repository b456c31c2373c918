"""bench/gpu/gpu.sh is run by whoever is lent a GPU, with minutes to spare: its SMOKE mode runs
every step on the CPU at toy sizes, so a broken flag or summary shows up here instead of there."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GPU_SH = ROOT / "bench" / "gpu" / "gpu.sh"


def _json_lines(path: Path) -> list[dict]:
    """The records a benchmark of the suite wrote to `path`, after its header line."""
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]
    assert lines and lines[0]["header"] and lines[0]["command"].startswith("python -m bench ")
    return [line for line in lines if not line.get("header")]


@pytest.mark.slow
def test_every_step_of_the_gpu_script_runs_in_smoke_mode(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "SMOKE": "1", "OUT": str(out),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    logs = ROOT / "runs" / "hpo-gpu-bench"  # where step 6's logs went before it ran inside OUT
    there_before = logs.exists()
    done = subprocess.run(["bash", str(GPU_SH)], env=env, cwd=tmp_path,
                          check=False, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    generation = _json_lines(out / "generation.jsonl")
    assert generation and generation[0]["scenes"] == 256
    assert {r["preset"] for r in _json_lines(out / "train_throughput.jsonl")} == {"smoke", "quick"}
    assert "| trial" in (out / "trial_profile.txt").read_text()
    assert _json_lines(out / "trial_profile.txt")[0]["trial_s"] > 0
    assert _json_lines(out / "localize.jsonl")[-1]["met"] in (True, False)
    trial = json.loads((out / "full-trial-summary.json").read_text())
    assert trial["epochs"] == 2 and trial["trial_s"] > 0
    run = json.loads((out / "run-summary.json").read_text())
    assert (run["budget"], run["finished"], run["200_trials_extrapolated"]) == (2, 2, True)
    assert run["epochs_trained"] >= 2 and run["gpu_busy_mean_pct"] is None  # no nvidia-smi here
    assert "2/2 finished" in (out / "run.txt").read_text()
    compiled = {r["compile"]: r for r in _json_lines(out / "compile.jsonl")}
    assert set(compiled) == {"none", "default"}
    assert all(r["train_scenes_per_s_median"] > 0 for r in compiled.values())
    assert re.search(r"hpo run gets --timeout \d+ \(BUDGET_S=540, \d+ s used\)", done.stdout)
    # everything the study wrote stays under OUT, nothing in the checkout or the caller's cwd
    assert (out / "runs" / "hpo-gpu-bench").is_dir()
    assert logs.exists() == there_before
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_failing_step_is_reported_and_the_others_still_run(tmp_path):
    # STEPS picks steps; an `hpo` whose `train` fails breaks step 5 alone: step 6 (`hpo run`)
    # still runs, the summary names step 5 and the exit status is 1.
    out, shims = tmp_path / "out", tmp_path / "bin"
    shims.mkdir()
    real = Path(sys.executable).parent / "hpo"
    (shims / "hpo").write_text(
        f'#!/bin/sh\nif [ "$1" = train ]; then echo "broken on purpose" >&2; exit 3; fi\n'
        f'exec "{real}" "$@"\n'
    )
    (shims / "hpo").chmod(0o755)
    path = os.pathsep.join([str(shims), str(Path(sys.executable).parent), os.environ["PATH"]])
    env = {**os.environ, "SMOKE": "1", "OUT": str(out), "STEPS": "5 6", "PATH": path}
    done = subprocess.run(["bash", str(GPU_SH)], env=env, cwd=tmp_path,
                          check=False, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "!! step 5 failed (exit 3)" in done.stdout
    assert done.stdout.rstrip().splitlines()[-1].startswith('failed steps: 5 (rerun them alone')
    assert "== 6." in done.stdout and "== 1." not in done.stdout and "== 4." not in done.stdout
    assert json.loads((out / "run-summary.json").read_text())["finished"] == 2
    assert not (out / "generation.jsonl").exists()


def _signal_during_step_6(tmp_path: Path, ready) -> tuple[int, str, Path]:
    """Run steps 6 and 7, send SIGINT to the script's process group once `ready(out)` is true
    (polled after step 6's heading), and return the exit status, the output and OUT."""
    out = tmp_path / "out"
    env = {**os.environ, "SMOKE": "1", "OUT": str(out), "STEPS": "6 7",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen(["bash", str(GPU_SH)], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        seen = ""
        while "== 6." not in seen:
            line = proc.stdout.readline()
            assert line, seen
            seen += line
        deadline = time.monotonic() + 120
        while not ready(out):
            assert proc.poll() is None and time.monotonic() < deadline, seen
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, seen + rest, out


def _stopped_in_step_6(code: int, text: str, out: Path) -> None:
    assert code == 1, text
    assert "!! step 6 stopped by a signal" in text
    assert "!! stopped by a signal before step 7" in text and "== 7." not in text
    assert text.rstrip().splitlines()[-1].startswith('failed steps: 6 7 (rerun them alone')
    assert not (out / "compile.jsonl").exists()


@pytest.mark.slow
def test_a_signal_stops_the_running_step_and_skips_the_rest(tmp_path):
    # bench/gpu/gpu_device.sh stops gpu.sh with `timeout -s INT` at its deadline: the signal
    # reaches the whole process group. Sent once step 6's `hpo run` has started its workers, it
    # ends that step (hpo run records its trials and exits 130) and step 7 is skipped, not started.
    def workers_started(out: Path) -> bool:
        return any((out / "runs" / "hpo-gpu-bench").glob("worker-*.log"))

    code, text, out = _signal_during_step_6(tmp_path, workers_started)
    _stopped_in_step_6(code, text, out)
    assert "!! step 6 stopped by a signal (exit 130)" in text
    assert "interrupted" in (out / "run.txt").read_text()


@pytest.mark.slow
def test_a_signal_before_hpo_run_starts_stops_the_same_way(tmp_path):
    # The same signal sent as step 6 begins, before `hpo run` exists to take it: the step still
    # counts as stopped and step 7 is skipped, whatever the step's command made of it.
    code, text, out = _signal_during_step_6(tmp_path, lambda out: True)
    _stopped_in_step_6(code, text, out)
