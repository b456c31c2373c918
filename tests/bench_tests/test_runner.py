"""The benchmark suite's runner, `python -m bench`: its listing, its errors, every benchmark's
--help, and the cheapest benchmarks run at toy size, printing JSON lines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench import BENCHMARKS

ROOT = Path(__file__).resolve().parents[2]
KINDS = ("pipeline", "service", "studies")


def _bench(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, check=False)  # fmt: skip


def _records(stdout: str, command: str) -> list[dict]:
    """Every line of stdout is one JSON object; the first is the header naming `command`."""
    lines = [json.loads(line) for line in stdout.splitlines()]
    assert lines[0]["header"] is True and lines[0]["command"] == command, lines[0]
    assert {"cpu", "cores", "torch", "threads", "device"} <= lines[0]["machine"].keys()
    return lines[1:]


def test_every_module_of_the_suite_is_registered_with_a_target():
    modules = {p.stem: p.parent.name for kind in KINDS
               for p in (ROOT / "bench" / kind).glob("*.py") if not p.stem.startswith("_")}
    assert modules == {name: b.kind for name, b in BENCHMARKS.items()}
    assert all(len(b.target) > 20 for b in BENCHMARKS.values())


def test_without_a_name_it_lists_every_benchmark_with_its_target():
    done = _bench()
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())  # the targets are wrapped
    for b in BENCHMARKS.values():
        assert f" {b.name} {' '.join(b.target.split())}" in text
    assert "bench/gpu/gpu.sh" in text


def test_the_listing_imports_no_benchmark():
    # so that it is instant: no torch, no Optuna
    script = ("import sys\nfrom bench.__main__ import main\nmain([])\n"
              "print(sorted(m for m in ('torch', 'optuna', 'bench.pipeline') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip
    assert done.stdout.splitlines()[-1] == "[]", done.stdout + done.stderr


def test_an_unknown_name_is_one_line_and_exit_2():
    done = _bench("train-throughput")
    assert done.returncode == 2
    assert done.stdout == ""
    [line] = done.stderr.splitlines()
    assert line.startswith("error: ") and "'train-throughput'" in line and "python -m bench" in line


def test_every_benchmark_answers_help():
    # One interpreter for all of them (each --help imports its module: torch, Optuna), as the
    # runner would call each.
    script = (
        "import contextlib, io, json, sys\n"
        "from bench.__main__ import main\n"
        "from bench import BENCHMARKS\n"
        "out = {}\n"
        "for name in BENCHMARKS:\n"
        "    buffer = io.StringIO()\n"
        "    with contextlib.redirect_stdout(buffer):\n"
        "        try:\n"
        "            main([name, '--help'])\n"
        "            code = None\n"
        "        except SystemExit as e:\n"
        "            code = e.code\n"
        "    out[name] = [code, buffer.getvalue()]\n"
        "print(json.dumps(out))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    helps = json.loads(done.stdout)
    assert helps.keys() == BENCHMARKS.keys()
    for name, (code, text) in helps.items():
        assert code == 0, (name, text)
        assert text.startswith(f"usage: python -m bench {name} "), text
        assert "target: " in text and " ".join(BENCHMARKS[name].target.split()) in " ".join(
            text.split())


def test_generation_runs_at_toy_size_through_the_runner():
    argv = ["generation", "--preset", "smoke", "--scenes", "256", "--repeats", "1",
            "--device", "cpu"]  # fmt: skip
    done = _bench(*argv)
    assert done.returncode == 0, done.stderr[-3000:]
    [record] = _records(done.stdout, "python -m bench " + " ".join(argv))
    assert record["scenes"] == 256 and record["scenes_per_s_in_batches_median"] > 0


def test_train_throughput_times_the_real_training_step(monkeypatch, capsys):
    from bench.pipeline import train_throughput
    from pipeline import TrainStep

    calls = {"step": 0, "end_epoch": 0}
    step, end_epoch = TrainStep.__call__, TrainStep.end_epoch

    def counted_step(self, *args, **kwargs):
        calls["step"] += 1
        return step(self, *args, **kwargs)

    def counted_end(self):
        calls["end_epoch"] += 1
        return end_epoch(self)

    monkeypatch.setattr(TrainStep, "__call__", counted_step)
    monkeypatch.setattr(TrainStep, "end_epoch", counted_end)
    argv = ["--presets", "smoke", "--steps", "2", "--repeats", "1", "--device", "cpu"]
    train_throughput.main(argv)
    [record] = _records(capsys.readouterr().out, "python -m bench train_throughput "
                        + " ".join(argv))
    assert record["preset"] == "smoke" and record["train_scenes_per_s_median"] > 0
    # a warm-up pass and one timed repeat, 2 steps each, each pass ending its epoch
    assert calls == {"step": 4, "end_epoch": 2}
