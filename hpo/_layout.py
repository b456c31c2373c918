"""The worker layout: how many worker processes, on which device, GPU and thread count each."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from hpo._errors import LaunchError


class Device(str, Enum):
    """Where the workers train: auto (every visible GPU, else the CPU), cpu or cuda."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


@dataclass(frozen=True)
class WorkerSlot:
    index: int
    device: str  # "cpu" or "cuda"
    cuda_visible_devices: str  # what the child sees as its only GPU; "" hides every GPU
    threads: int  # torch intra-op threads


# CPU default: one single-threaded worker per core. Measured on the 2-core machine (quick preset,
# 16 trials of 2 epochs, python -m bench overhead): 2 workers x 1 thread 42.9 s, 1 worker x 2 threads
# 59.8 s; the small per-scene operations of a trial scale better across processes than across
# threads. Capped so that a many-core host does not start dozens of ~0.5 GB processes unasked.
CPU_WORKERS_MAX = 8


def plan_slots(
    *,
    device: str,
    workers: int | None,
    gpus: str | None,
    workers_per_gpu: int | None,
    n_gpus: int,
    visible: str | None,
    n_cpus: int,
    threads: int | None = None,
) -> list[WorkerSlot]:
    """The worker layout: one per visible GPU (or `--gpus`, times `--workers-per-gpu`), or on the
    CPU one per core (at most CPU_WORKERS_MAX) with one thread each; `--workers N` spreads N over
    the GPUs round-robin. Each worker gets `threads` torch
    threads, by default the cores divided among the workers (never more threads than cores: an
    oversubscribed OpenMP pool can run ten times slower). LaunchError names the problem."""
    if threads is not None and threads < 1:
        raise LaunchError(f"--threads must be >= 1, but got {threads}")
    if device not in ("auto", "cpu", "cuda"):
        raise LaunchError(f"--device must be auto, cpu or cuda, but got {device!r}")
    if workers is not None and workers < 1:
        raise LaunchError(f"--workers must be >= 1, but got {workers}")
    if workers_per_gpu is not None and workers_per_gpu < 1:
        raise LaunchError(f"--workers-per-gpu must be >= 1, but got {workers_per_gpu}")
    gpu_ids = parse_gpus(gpus, n_gpus) if gpus is not None else None
    if gpu_ids is not None and device == "cpu":
        raise LaunchError("--gpus cannot be combined with --device cpu")
    use_gpus = gpu_ids is not None or device == "cuda" or (device == "auto" and n_gpus > 0)
    if use_gpus and n_gpus == 0:
        raise LaunchError("--device cuda asked for, but CUDA is not available on this machine")
    if not use_gpus:
        if workers_per_gpu is not None:
            raise LaunchError("--workers-per-gpu needs GPUs, and the workers run on the CPU")
        n = workers or max(1, min(n_cpus, CPU_WORKERS_MAX))
        per_worker = threads or max(1, n_cpus // n)
        return [WorkerSlot(i, "cpu", "", per_worker) for i in range(n)]
    ids = gpu_ids if gpu_ids is not None else list(range(n_gpus))
    per_gpu = workers_per_gpu or 1
    if workers is not None and workers_per_gpu is not None and workers != per_gpu * len(ids):
        raise LaunchError(
            f"--workers {workers} disagrees with --workers-per-gpu {per_gpu} on {len(ids)} GPU(s)"
        )
    n = workers if workers is not None else per_gpu * len(ids)
    names = [v.strip() for v in visible.split(",")] if visible else None
    per_worker = threads or max(1, n_cpus // n)
    return [
        WorkerSlot(
            i, "cuda", names[ids[i % len(ids)]] if names else str(ids[i % len(ids)]), per_worker
        )
        for i in range(n)
    ]


def parse_gpus(text: str, n_gpus: int) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise LaunchError(f"--gpus takes GPU numbers like 0,1,3, but got {text!r}") from None
    if not ids:
        raise LaunchError(f"--gpus takes GPU numbers like 0,1,3, but got {text!r}")
    if len(set(ids)) != len(ids):
        raise LaunchError(f"--gpus names a GPU twice: {text!r}")
    if n_gpus == 0:
        raise LaunchError(f"--gpus {text}: this machine has no visible CUDA GPU")
    missing = [i for i in ids if not 0 <= i < n_gpus]
    if missing:
        raise LaunchError(
            f"--gpus names GPU {missing[0]}, but only GPU 0-{n_gpus - 1} are visible"
            if n_gpus > 1
            else f"--gpus names GPU {missing[0]}, but only GPU 0 is visible"
        )
    return ids


def visible_gpu_count(device: str) -> int:
    """GPUs torch sees. With `auto` and no sign of an NVIDIA driver, 0 without importing torch
    (1-2 s) in the launcher; `cuda` always asks torch, since sandboxes such as gVisor show the
    GPU's device files but may have no /proc/driver/nvidia."""
    if device == "cpu" or (device == "auto" and not nvidia_driver_visible()):
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def nvidia_driver_visible(root: Path = Path("/")) -> bool:
    dev = root / "dev"
    return ((root / "proc" / "driver" / "nvidia").exists() or (dev / "nvidiactl").exists()
            or any(dev.glob("nvidia[0-9]*")))
