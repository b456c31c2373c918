"""The worker layout, how workers start, and the progress line (the processes are in
test_run.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from optuna.trial import TrialState, create_trial

from hpo._budget import StudyCounts
from hpo._errors import LaunchError
from hpo._layout import WorkerSlot, plan_slots
from hpo._processes import start_method
from hpo._progress import format_progress


def plan(**kwargs):
    args = {
        "device": "auto",
        "workers": None,
        "gpus": None,
        "workers_per_gpu": None,
        "n_gpus": 0,
        "visible": None,
        "n_cpus": 2,
    }
    return plan_slots(**{**args, **kwargs})


def test_cpu_default_is_one_single_threaded_worker_per_core():
    assert plan() == [WorkerSlot(0, "cpu", "", 1), WorkerSlot(1, "cpu", "", 1)]
    assert plan(n_cpus=1) == [WorkerSlot(0, "cpu", "", 1)]
    assert len(plan(n_cpus=64)) == 8 and all(s.threads == 8 for s in plan(n_cpus=64))


def test_cpu_workers_share_the_cores_without_oversubscribing():
    assert [s.threads for s in plan(workers=2)] == [1, 1]
    assert [s.threads for s in plan(workers=2, n_cpus=16)] == [8, 8]
    assert [s.threads for s in plan(workers=4)] == [1, 1, 1, 1]
    assert [s.threads for s in plan(workers=2, n_cpus=16, threads=3)] == [3, 3]


def test_one_worker_per_visible_gpu_by_default():
    slots = plan(n_gpus=3, n_cpus=12)
    assert [(s.device, s.cuda_visible_devices, s.threads) for s in slots] == [
        ("cuda", "0", 4),
        ("cuda", "1", 4),
        ("cuda", "2", 4),
    ]


def test_gpus_workers_per_gpu_and_round_robin():
    assert [s.cuda_visible_devices for s in plan(n_gpus=4, gpus="0,1,3")] == ["0", "1", "3"]
    assert [s.cuda_visible_devices for s in plan(n_gpus=2, workers_per_gpu=2)] == [
        "0", "1", "0", "1",
    ]  # fmt: skip
    assert [s.cuda_visible_devices for s in plan(n_gpus=2, workers=3)] == ["0", "1", "0"]


def test_the_parents_cuda_visible_devices_is_respected():
    # With CUDA_VISIBLE_DEVICES=5,7 the process sees two GPUs, numbered 0 and 1.
    slots = plan(n_gpus=2, visible="5,7", gpus="1")
    assert [s.cuda_visible_devices for s in slots] == ["7"]


def test_cpu_workers_see_no_gpu():
    assert plan(device="cpu", n_gpus=2, workers=2)[0].cuda_visible_devices == ""


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"gpus": "0"}, "--gpus 0: this machine has no visible CUDA GPU"),
        ({"gpus": "0,2", "n_gpus": 2}, "--gpus names GPU 2, but only GPU 0-1 are visible"),
        ({"gpus": "1", "n_gpus": 1}, "--gpus names GPU 1, but only GPU 0 is visible"),
        ({"gpus": "a,b", "n_gpus": 2}, "takes GPU numbers"),
        ({"gpus": "0,0", "n_gpus": 2}, "names a GPU twice"),
        ({"gpus": "0", "n_gpus": 1, "device": "cpu"}, "cannot be combined with --device cpu"),
        ({"device": "cuda"}, "CUDA is not available"),
        ({"device": "tpu"}, "--device must be auto, cpu or cuda"),
        ({"workers": 0}, "--workers must be >= 1"),
        ({"threads": 0}, "--threads must be >= 1"),
        ({"workers_per_gpu": 2}, "--workers-per-gpu needs GPUs"),
        ({"workers": 3, "workers_per_gpu": 2, "n_gpus": 2}, "disagrees"),
    ],
)
def test_impossible_layouts_are_one_line_errors(kwargs, expected):
    with pytest.raises(LaunchError) as info:
        plan(**kwargs)
    assert expected in str(info.value)


def test_progress_line_has_counts_best_rate_and_eta():
    counts = StudyCounts(complete=5, pruned=3, failed=2, requeued=1, running=2, waiting=1)
    best = create_trial(state=TrialState.COMPLETE, value=0.8123)
    best.number = 7
    line = format_progress(counts, 200, best=best, elapsed_s=600.0, finished_before=0)
    assert line.startswith("10/200 finished (5 complete, 3 pruned, 2 failed), 2 running")
    assert "best 0.8123 (trial 7)" in line
    assert "60 trials/h" in line and "ETA 3h10m" in line
    quiet_start = format_progress(counts, 12, best=None, elapsed_s=1.0, finished_before=10)
    assert "best -" in quiet_start and "-- trials/h" in quiet_start


def test_the_fork_servers_imports_start_no_thread_and_leave_cuda_alone():
    # Workers are forked from a process that imported FORKSERVER_PRELOAD: forking is safe only
    # if those imports started no thread and initialised no CUDA context.
    code = (
        "import importlib, sys, threading\n"
        "from hpo._processes import FORKSERVER_PRELOAD\n"
        "for name in FORKSERVER_PRELOAD: importlib.import_module(name)\n"
        "import torch\n"
        "print(threading.active_count(), torch.cuda.is_initialized(), 'torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, timeout=120)  # fmt: skip
    assert result.stdout.split() == ["1", "False", "True"]


def test_hpo_worker_start_chooses_how_workers_start(monkeypatch):
    monkeypatch.delenv("HPO_WORKER_START", raising=False)
    assert start_method() == "forkserver"  # Linux has it
    monkeypatch.setenv("HPO_WORKER_START", "exec")
    assert start_method() == "exec"
    monkeypatch.setenv("HPO_WORKER_START", "fork")
    with pytest.raises(LaunchError, match="must be one of forkserver, exec"):
        start_method()


def test_a_worker_is_recognised_by_its_process_however_it_started():
    # worker_alive decides whether a RUNNING trial's worker (by the pid it recorded) still
    # runs: a forked worker and a fresh-interpreter one are workers; a dead pid, or a pid taken
    # by some other program, is not.
    from hpo._processes import forkserver_context, worker_alive

    forked = forkserver_context().Process(target=time.sleep, args=(30,))
    forked.start()
    fresh = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "hpo._worker"])
    other = subprocess.Popen(["sleep", "30"])
    try:
        assert worker_alive(forked.pid)
        assert worker_alive(fresh.pid)
        assert not worker_alive(other.pid)
    finally:
        forked.kill()
        fresh.kill()
        other.kill()
    forked.join()
    fresh.wait()
    other.wait()
    assert not worker_alive(fresh.pid)


def test_workers_start_as_fresh_interpreters_when_the_fork_server_fails(tmp_path, monkeypatch):
    # A fork server that cannot start, or is lost mid-study and cannot fork, costs start-up
    # speed only: one warning line, and workers start by exec; the study still runs.
    import io
    from multiprocessing import forkserver

    import hpo._launch as launch
    import hpo._processes as processes
    from hpo._search_space import default_space
    from hpo._studies import StudySettings, StudySpec, create_or_load_study
    from hpo._worker import WorkerSpec
    from pipeline import config_to_dict, preset
    from storage import open_storage, resolve_url

    def no_server() -> None:
        raise OSError("no socket here")

    monkeypatch.setattr(forkserver, "ensure_running", no_server)
    warnings: list[str] = []
    assert processes.warm_up("forkserver", warn=warnings.append) == "exec"
    assert len(warnings) == 1 and "fork server did not start (no socket here)" in warnings[0]
    assert processes.warm_up("exec", warn=warnings.append) == "exec" and len(warnings) == 1

    class _LostServer:
        def Process(self, **kwargs):
            return self

        def start(self) -> None:
            raise EOFError("fork server gone")

    monkeypatch.setattr(processes, "forkserver_context", _LostServer)
    location = resolve_url(f"sqlite:///{tmp_path / 'hpo.db'}")
    base = preset("smoke")
    settings = StudySettings(preset="smoke", objective="composite", direction="minimize",
                             epochs=base.epochs)  # fmt: skip
    plan_of_study = StudySpec(config=config_to_dict(base), space=default_space(base).to_dict(),
                              pruner="none", reduction_factor=3, sampler="random")
    study = create_or_load_study(open_storage(location), "lost", settings, budget=1,
                                 spec=plan_of_study)  # fmt: skip
    spec = WorkerSpec(study="lost", sampler_seed=0, device="cpu", threads=1, index=0,
                      parent_pid=os.getpid(), heartbeat_interval_s=2, grace_period_s=10,
                      reconnect_s=10.0)  # fmt: skip
    out = io.StringIO()
    slot = plan(device="cpu", workers=1, threads=1)[0]
    launcher = launch.Launcher(location=location, study=study, spec=spec, slots=[slot],
                               seed=0, log_dir=tmp_path / "logs", quiet=True, out=out,
                               method="forkserver")  # fmt: skip
    result = launcher.run()
    assert result.counts.complete == 1 and not result.worker_deaths
    assert "cannot fork a worker (fork server gone)" in out.getvalue()
    assert launcher.start_method == "exec"


def test_device_cuda_asks_torch_even_where_proc_shows_no_nvidia_driver(monkeypatch):
    # The lent GPU machines run in sandboxes (gVisor) that may have no /proc/driver/nvidia: there
    # `--device cuda` must still find the GPUs torch sees, and `auto` too when /dev shows them.
    import torch

    from hpo import _layout

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(_layout, "nvidia_driver_visible", lambda: False)
    assert _layout.visible_gpu_count("cuda") == 2
    assert _layout.visible_gpu_count("auto") == 0  # no driver in sight: torch not asked
    assert _layout.visible_gpu_count("cpu") == 0
    monkeypatch.setattr(_layout, "nvidia_driver_visible", lambda: True)
    assert _layout.visible_gpu_count("auto") == 2


def test_the_driver_is_seen_in_proc_or_dev(tmp_path):
    from hpo._layout import nvidia_driver_visible

    (tmp_path / "dev").mkdir()
    assert not nvidia_driver_visible(tmp_path)
    (tmp_path / "dev" / "nvidia0").touch()  # gVisor's nvproxy: device files, no /proc entry
    assert nvidia_driver_visible(tmp_path)
    (tmp_path / "dev" / "nvidia0").unlink()
    (tmp_path / "proc" / "driver" / "nvidia").mkdir(parents=True)
    assert nvidia_driver_visible(tmp_path)
