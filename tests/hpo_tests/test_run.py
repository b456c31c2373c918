"""`hpo run` end to end: real worker processes, the real stores, read back from this process."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from hpo import count_trials
from hpo.testing import environment, run_argv
from storage.testing import DUMMY_PASSWORD

pytestmark = pytest.mark.slow

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def command(*args: str) -> list[str]:
    # One torch thread per worker: the suite may share its cores with other processes, and an
    # OpenMP pool with as many threads as cores slows down tenfold when it does.
    return [
        sys.executable,
        "-m",
        "hpo.cli",
        *args,
        *(("--threads", "1") if args[0] == "run" else ()),
    ]


def hpo(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return run_argv(command(*args), cwd=cwd, timeout=timeout)


def trials_of(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=url).get_trials()


def all_output(result: subprocess.CompletedProcess[str] | tuple[str, str], cwd: Path) -> str:
    texts = list(result) if isinstance(result, tuple) else [result.stdout, result.stderr]
    texts += [p.read_text() for p in (cwd / "runs").rglob("*.log")]
    return "\n".join(texts)


def test_budget_pruning_failures_and_resume(store_url, tmp_path):
    name = f"e2e-{secrets.token_hex(3)}"
    space = tmp_path / "space.toml"
    # Half the trials get a NaN loss in their first epoch (the pipeline's fault injection); a
    # larger training set makes each trial take long enough for both workers to get some.
    space.write_text("fault_nonfinite_epoch = { choices = [0, 1] }\nn_train = 1024\n")
    common = ("--preset", "smoke", "--storage", store_url, "--study", name, "--quiet")
    first = hpo(
        "run", "--trials", "12", "--workers", "2", "--sampler", "random", "--seed", "3",
        "--pruner", "hyperband", "--space", str(space), *common, cwd=tmp_path,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    assert "12/12 finished" in first.stdout

    trials = trials_of(store_url, name)
    assert len(trials) == 12
    assert all(t.state in FINISHED for t in trials)
    states = [t.state for t in trials]
    # Whether Hyperband prunes here depends on the order in which the two workers' trials report;
    # test_hyperband_prunes_a_deterministic_study shows pruning in a run whose order is fixed.
    assert TrialState.COMPLETE in states and TrialState.FAIL in states
    assert len({t.user_attrs["worker_pid"] for t in trials}) >= 2
    for trial in trials:
        attrs = trial.user_attrs
        assert attrs["config"]["epochs"] == 2 and attrs["device"] == "cpu"
        assert attrs["seed"] == attrs["config"]["seed"]
        assert attrs["host"] and attrs["wall_time_s"] > 0
        steps = sorted(trial.intermediate_values)
        if trial.state == TrialState.FAIL:
            assert trial.params["fault_nonfinite_epoch"] == 1
            assert attrs["fail_reason"].startswith("NumericalError: ")
            assert steps == []
            continue
        assert steps == list(range(1, len(steps) + 1))  # one report per epoch it ran
        assert [h["epoch"] for h in attrs["history"]] == steps
        if trial.state == TrialState.COMPLETE:
            assert steps == [1, 2]
            # The value is the objective (composite) of the last epoch: no loss weight in it.
            assert trial.value == attrs["history"][-1]["composite"]
            assert trial.value == trial.intermediate_values[2]
        else:
            assert 1 <= len(steps) < 2
            assert "pruned at epoch" in attrs["pruned_reason"]

    second = hpo("run", "--trials", "16", "--workers", "2", *common, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    again = trials_of(store_url, name)
    assert len(again) == 16  # exactly 4 more
    assert [t.state for t in again[:12]] == states
    assert all(t.state in FINISHED for t in again)

    status = hpo("status", "--storage", store_url, "--study", name, "--json", cwd=tmp_path)
    counts = json.loads(status.stdout)["counts"]
    assert counts["finished"] == 16 and counts["running"] == counts["waiting"] == 0
    best = json.loads(
        hpo("best", "--storage", store_url, "--study", name, "--json", cwd=tmp_path).stdout
    )
    assert {"value", "number", "params", "metrics", "config"} <= set(best)
    expected = min((t for t in again if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    assert (best["number"], best["value"], best["params"]) == (
        expected.number,
        expected.value,
        expected.params,
    )
    assert best["config"]["lr"] == best["params"]["lr"]
    for result in (first, second, status):
        assert DUMMY_PASSWORD not in all_output(result, tmp_path)


def test_hyperband_prunes_a_deterministic_study(store_url, tmp_path):
    # One worker and a seeded sampler fix the order of reports, so the pruner's decisions are the
    # same on every run: with this seed Hyperband stops some trials after their first epoch.
    name = f"prune-{secrets.token_hex(3)}"
    space = tmp_path / "space.toml"
    space.write_text("n_train = 256\n")
    result = hpo(
        "run", "--trials", "8", "--workers", "1", "--threads", "1", "--sampler", "random",
        "--seed", "3", "--pruner", "hyperband", "--preset", "smoke", "--storage", store_url,
        "--study", name, "--quiet", "--space", str(space), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    trials = trials_of(store_url, name)
    assert len(trials) == 8
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert pruned and complete
    for trial in pruned:
        assert sorted(trial.intermediate_values) == [1]  # stopped after its first epoch
        assert "pruned at epoch 1" in trial.user_attrs["pruned_reason"]
    for trial in complete:
        assert sorted(trial.intermediate_values) == [1, 2]
    # Disk: a pruned trial leaves no checkpoint directory; the best complete ones (at most
    # --keep-checkpoints, 3) keep their final checkpoint, the others are deleted.
    directories = tmp_path / "runs" / "checkpoints" / name
    for trial in pruned:
        assert not (directories / f"trial-{trial.number}").exists()
    best = sorted(complete, key=lambda t: t.value)
    for trial in best[:3]:
        assert Path(trial.user_attrs["checkpoint"]).is_file()
    assert sorted(p.name for p in directories.iterdir()) == sorted(
        f"trial-{t.number}" for t in best[:3])


def _wait_for_running(url: str, name: str, n: int, proc: subprocess.Popen[str]) -> list[int]:
    """Worker pids of `n` RUNNING trials, once they are mid-training."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            running = [t for t in trials_of(url, name) if t.state == TrialState.RUNNING]
        except KeyError:  # the study is not created yet
            running = []
        # Mid-training: at least one epoch reported and at least two to go (a trial about to
        # finish may complete before a signal reaches it on a loaded machine).
        if len(running) >= n and all(
            1 <= len(t.user_attrs.get("history", [])) <= 2 for t in running
        ):
            return [t.user_attrs["worker_pid"] for t in running]
        time.sleep(0.2)
    raise AssertionError("no trials started")


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def _children_of(pid: int) -> list[int]:
    """Direct children of `pid` (the fork server among them)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def slow_trials(tmp_path: Path) -> str:
    """A space file making smoke trials last seconds (about 1 s per epoch on one core), so a
    test can catch them mid-training."""
    path = tmp_path / "slow.toml"
    path.write_text("n_train = 2048\n")
    return str(path)


def test_ctrl_c_stops_within_seconds_leaves_nothing_behind_and_rerun_finishes(store_url, tmp_path):
    name = f"sigint-{secrets.token_hex(3)}"
    common = ("--preset", "smoke", "--storage", store_url, "--study", name, "--quiet")
    common += ("--space", slow_trials(tmp_path))
    args = ("run", "--trials", "40", "--epochs", "4", "--pruner", "none", "--workers", "2")
    proc = subprocess.Popen(
        command(*args, *common),
        cwd=tmp_path,
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        pids = _wait_for_running(store_url, name, 2, proc)
        helpers = _children_of(proc.pid)  # the fork server and its resource tracker
        for pid in [*pids, *helpers]:  # the URL travels in the environment, never on argv
            assert DUMMY_PASSWORD not in Path(f"/proc/{pid}/cmdline").read_text()
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        elapsed = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert elapsed < 15
    assert "run the same command again" in err
    assert _processes_mentioning(name) == []
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists()
    deadline = time.monotonic() + 10  # the fork server sees its launcher gone, then exits
    while any(Path(f"/proc/{pid}").exists() for pid in helpers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in helpers if Path(f"/proc/{pid}").exists()]
    trials = trials_of(store_url, name)
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    interrupted = [
        t for t in trials if "interrupted by SIGINT" in t.user_attrs.get("fail_reason", "")
    ]
    assert {t.user_attrs["worker_pid"] for t in interrupted} == set(pids)
    counts = count_trials(trials)
    assert counts.requeued == len(interrupted) == counts.waiting

    budget = counts.finished + 3
    rerun = hpo(
        "run", "--trials", str(budget), "--epochs", "4", "--pruner", "none", *common, cwd=tmp_path
    )
    assert rerun.returncode == 0, rerun.stderr
    final = trials_of(store_url, name)
    counts = count_trials(final)
    assert (counts.finished, counts.running, counts.waiting) == (budget, 0, 0)
    retried = [t for t in final if "retry_of" in t.user_attrs]
    assert {t.user_attrs["retry_of"] for t in retried} == {t.number for t in interrupted}
    assert all(t.state in FINISHED for t in retried)
    assert DUMMY_PASSWORD not in all_output((out, err), tmp_path) + all_output(rerun, tmp_path)


@pytest.mark.parametrize("method", ["forkserver", "exec"])
def test_both_ways_of_starting_workers_fill_the_budget(tmp_path, method):
    # Forked from the preloaded fork server (the default) or fresh interpreters: the same study.
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    result = subprocess.run(
        command("run", "--trials", "4", "--preset", "smoke", "--workers", "2", "--seed", "1",
                "--storage", url, "--study", "start", "--quiet"),
        cwd=tmp_path, env={**environment(), "HPO_WORKER_START": method},
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    trials = trials_of(url, "start")
    assert count_trials(trials).finished == 4 and len(trials) == 4
    pids = {t.user_attrs["worker_pid"] for t in trials}
    assert len(pids) == 2 and os.getpid() not in pids
    for pid in pids:  # every worker logged its trials to its own file and is gone
        assert not Path(f"/proc/{pid}").exists()
    logs = sorted((tmp_path / "runs" / "hpo-start").glob("worker-*.log"))
    assert len(logs) == 2
    assert sum(log.read_text().count(": COMPLETE") + log.read_text().count(": PRUNED")
               for log in logs) == 4  # fmt: skip


def test_a_worker_that_dies_is_replaced_and_its_trial_recorded(tmp_path):
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    name = "dies"
    args = ("run", "--trials", "3", "--preset", "smoke", "--epochs", "4", "--pruner", "none",
            "--workers", "1")  # the CPU default is one worker per core
    proc = subprocess.Popen(
        command(
            *args, "--storage", url, "--study", name, "--quiet", "--space", slow_trials(tmp_path)
        ),
        cwd=tmp_path,
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        [pid] = _wait_for_running(url, name, 1, proc)
        os.kill(pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "starting a replacement" in err
    trials = trials_of(url, name)
    # The killed trial is re-queued (its FAIL does not count) and its retry fills the slot.
    assert count_trials(trials).finished == 3 and len(trials) == 4
    [killed] = [t for t in trials if t.user_attrs["worker_pid"] == pid]
    assert killed.state == TrialState.FAIL
    assert f"worker process {pid} was killed by SIGKILL" in killed.user_attrs["fail_reason"]
    [retry] = [t for t in trials if t.user_attrs.get("retry_of") == killed.number]
    assert retry.params == killed.params and retry.state in FINISHED
    assert len({t.user_attrs["worker_pid"] for t in trials}) == 2


def test_a_time_limit_starts_no_trial_after_it_and_finishes_the_running_ones(tmp_path):
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    name = "timeout"
    result = hpo("run", "--trials", "40", "--preset", "smoke", "--epochs", "4", "--pruner", "none",
                 "--workers", "2", "--timeout", "10", "--storage", url, "--study", name,
                 "--space", slow_trials(tmp_path), cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "no trial starts after 10 s" in result.stderr.splitlines()[0]
    assert "time limit of 10 s reached" in result.stderr
    # Each worker logs the deadline (UTC) when it stops; the trials' datetimes are UTC too.
    logs = [p.read_text() for p in (tmp_path / "runs" / f"hpo-{name}").glob("worker-*.log")]
    pattern = r"time limit of hpo run \((\S+)\) reached"
    found = {m for log in logs for m in re.findall(pattern, log)}
    assert len(found) == 1 and len(logs) == 2, logs
    deadline = datetime.fromisoformat(found.pop()).replace(tzinfo=None)
    trials = trials_of(url, name)
    counts = count_trials(trials)
    # Nothing lost: every trial started was finished, by training to its end.
    assert (counts.running, counts.waiting, counts.failed) == (0, 0, 0)
    assert 0 < counts.finished < 40 and all(t.state == TrialState.COMPLETE for t in trials)
    # Claims are refused from the deadline on, under the store lock; Optuna stamps a trial's start
    # a few milliseconds after its claim was allowed.
    assert all(t.datetime_start < deadline + timedelta(seconds=0.5) for t in trials)
    # Trials of 4 s (slow_trials) run back to back on both workers: they were training when the
    # time was up, and went on to their last epoch.
    assert [t for t in trials if t.datetime_complete > deadline]
    assert all(len(t.intermediate_values) == 4 for t in trials)


def test_the_pruner_and_its_reduction_factor_reach_every_trial(tmp_path):
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    result = hpo("run", "--trials", "3", "--preset", "smoke", "--pruner", "asha",
                 "--reduction-factor", "2", "--storage", url, "--study", "eta", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "tpe sampler, asha pruner (eta 2)" in result.stderr.splitlines()[0]
    trials = trials_of(url, "eta")
    assert len(trials) == 3
    assert all((t.user_attrs["pruner"], t.user_attrs["reduction_factor"]) == ("asha", 2)
               for t in trials)


def test_sbl_count_study_shares_one_front_end_and_maximises_success(tmp_path, monkeypatch):
    """A study of the SBL count network: its trials (two workers) compute the SBL front end of
    the training and validation scenes once and share it; --objective success is maximised."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("RIS_HPO_CACHE", str(cache))
    space = tmp_path / "space.toml"
    space.write_text('model = "sbl_count"\nfresh_train = false\nlam_aux = 0.0\nlam_det = 0.0\n'
                     "n_train = 256\nlr = { low = 1e-3, high = 1e-2, log = true }\n")
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    result = hpo("run", "--trials", "4", "--preset", "smoke", "--storage", url, "--study", "sc",
                 "--objective", "success", "--space", str(space), "--workers", "2",
                 "--pruner", "none", "--quiet", cwd=tmp_path)
    assert result.returncode == 0, all_output(result, tmp_path)
    trials = trials_of(url, "sc")
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert all(t.params["lr"] >= 1e-3 for t in trials)
    assert all(0.0 <= t.value <= 1.0 for t in trials)
    # one file per split, whatever the trials' other parameters: computed once, shared
    assert sorted(p.name.split("-")[0] for p in cache.glob("*.pt")) == ["train", "val"]
    study = optuna.load_study(study_name="sc", storage=url)
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    assert study.best_trial.value == max(t.value for t in trials)
