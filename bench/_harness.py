"""What every benchmark shares: its parser, device sync, machine info, JSON-lines output, stores.

Output: a benchmark's stdout is JSON lines, one object each, read by `json.loads` line by line.
The first is the header (`header`): the exact command, the machine, the device and threads. Then
`emit` prints one record per measurement. Anything for a human (progress, Markdown tables) goes to
stderr through `note`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


class BenchParser(argparse.ArgumentParser):
    """An argument parser whose namespace also holds `command`, the command line as typed."""

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        argv = list(sys.argv[1:] if args is None else args)
        parsed = super().parse_args(argv, namespace)
        parsed.command = f"{self.prog} {shlex.join(argv)}".strip()
        return parsed


def parser(module_name: str, doc: str | None) -> BenchParser:
    """The argument parser of the benchmark in `module_name` (its `__name__`): prog
    `python -m bench NAME`, the module docstring as description, its registered target below."""
    from bench import BENCHMARKS

    name = module_name.rsplit(".", 1)[-1]
    return BenchParser(
        prog=f"python -m bench {name}", description=doc,
        epilog=f"target: {BENCHMARKS[name].target}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip


TIMING_SEED = 20_261_203  # scenes for timing only; not a train, validation or test stream


def add_scene_options(parser: argparse.ArgumentParser, *, repeats: int) -> None:
    """--preset, --scenes, --repeats, --threads and --device of a per-scene timing benchmark."""
    parser.add_argument("--preset", default="medium")
    parser.add_argument("--scenes", type=int, default=64, help="scenes per timed batch")
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")


def cpu_system(args: argparse.Namespace) -> tuple[Any, Any]:
    """For an offline probe with --preset and --threads: torch's threads set, the header printed
    (device cpu), then (config, deployment) of the preset."""
    import torch

    from pipeline import Deployment, preset

    torch.set_num_threads(args.threads)
    config = preset(args.preset)
    deployment = Deployment.build(config)
    header(args, torch.device("cpu"))
    return config, deployment


def timing_scenes(args: argparse.Namespace) -> tuple[Any, ...]:
    """For `add_scene_options`' arguments: torch's threads set, then (device, config, deployment,
    scenes), the scenes drawn from TIMING_SEED."""
    import torch

    from pipeline import Deployment, generate_scenes, preset, resolve_device

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    config = preset(args.preset)
    deployment = Deployment.build(config, device)
    return device, config, deployment, generate_scenes(config, deployment, args.scenes,
                                                       TIMING_SEED)


def sync(device: torch.device | None) -> None:
    """Wait for the device's queued work (CUDA), so a timer around it times the work itself."""
    import torch

    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def timed(device: torch.device | None, seconds: list[float]) -> Iterator[None]:
    """Append the wall seconds of the block to `seconds`, synchronised with `device` both ends."""
    sync(device)
    start = time.perf_counter()
    yield
    sync(device)
    seconds.append(time.perf_counter() - start)


def machine_info(device: torch.device | None = None) -> dict[str, Any]:
    """The host (CPU model, cores this process may use), Python, torch and its threads, and the
    device's name when `device` is given (the GPU's on CUDA)."""
    info: dict[str, Any] = {
        "host": platform.node(),
        "cpu": _cpu_model(),
        "cores": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }
    if "torch" in sys.modules or device is not None:
        import torch

        info["torch"] = torch.__version__
        info["threads"] = torch.get_num_threads()
    if device is not None:
        info["device"] = str(device)
        import torch

        info["device_name"] = (torch.cuda.get_device_name(device) if device.type == "cuda"
                               else info["cpu"])  # fmt: skip
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        info["optuna"] = importlib.metadata.version("optuna")
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def header(args: argparse.Namespace, device: torch.device | None = None, **extra: Any) -> None:
    """The output's first line: the command as typed, the parsed options, the machine. Once per
    run, after the benchmark has set its threads and resolved its device."""
    options = {k: _plain(v) for k, v in vars(args).items() if k != "command"}
    emit({"header": True, "command": args.command, "options": options,
          "machine": machine_info(device), **extra})


def emit(record: dict[str, Any]) -> None:
    """One JSON object on one line of stdout, flushed (a long benchmark shows each as it ends)."""
    print(json.dumps(record, default=_plain), flush=True)


def note(text: str) -> None:
    """A line for a human, on stderr: stdout stays JSON lines."""
    print(text, file=sys.stderr, flush=True)


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (str, int, float, bool, list, dict)) or value is None:
        return value
    return str(value)


@contextlib.contextmanager
def sqlite_store(directory: Path | None = None, name: str = "bench.db") -> Iterator[str]:
    """The URL of a fresh SQLite file, in `directory` or in a temporary one removed afterwards."""
    if directory is not None:
        yield f"sqlite:///{Path(directory) / name}"
        return
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        yield f"sqlite:///{Path(tmp) / name}"


@contextlib.contextmanager
def postgres_store() -> Iterator[str]:
    """The URL of a fresh, empty PostgreSQL database, dropped afterwards
    (`storage.testing.fresh_postgres_database`: $HPO_TEST_POSTGRES names the admin URL, by default
    the local server scripts/test.sh starts). No server: one line, exit 1."""
    from storage.testing import ServerUnavailableError, fresh_postgres_database

    try:
        with fresh_postgres_database() as url:
            yield url
    except ServerUnavailableError as error:
        raise SystemExit(f"error: {error}") from None


def processes() -> Iterator[tuple[int, str, list[str]]]:
    """(pid, name, the fields of /proc/PID/stat after the name) of every process now."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        yield int(entry.name), name, stat.rsplit(")", 1)[1].split()


def postgres_cpu_s() -> float:
    """CPU seconds of this machine's PostgreSQL processes so far, ended backends included (the
    postmaster reaps them: their time is in its children's time)."""
    total = sum(
        sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
        for _, name, fields in processes()
        if name.startswith("postgres")
    )
    return total / os.sysconf("SC_CLK_TCK")
