"""Cost of coded SBL per scene (pipeline._sbl), one CPU thread by default.

Times `sparse_bayesian_learning` on a batch of scenes of the preset, with its own count (as
`hpo evaluate` runs it) and with the true count, `--repeats` times after one warm-up (which
builds the cached dictionary and basis); prints the median seconds per scene of each, and the
same for scenes one at a time (a latency, not a throughput).

    python bench/sbl.py [--preset medium] [--scenes 64] [--single 8] [--repeats 5]
                        [--threads 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from pipeline import preset, resolve_device
from pipeline._data import generate_scenes
from pipeline._physics import Deployment
from pipeline._sbl import SblSettings, sparse_bayesian_learning

BENCH_SEED = 20_261_203  # scenes for timing only; not a train, validation or test stream


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(run, repeats: int, device: torch.device) -> list[float]:
    run()  # warm-up: caches, allocator
    _sync(device)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="medium")
    parser.add_argument("--scenes", type=int, default=64, help="scenes per timed batch")
    parser.add_argument("--single", type=int, default=8, help="scenes timed one at a time")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    config = preset(args.preset)
    deployment = Deployment.build(config, device)
    scenes = generate_scenes(config, deployment, args.scenes, BENCH_SEED)
    settings = SblSettings()
    result = {"preset": args.preset, "device": str(device), "threads": args.threads,
              "scenes": args.scenes, "repeats": args.repeats, "settings": settings.__dict__,
              "torch": torch.__version__, "machine": platform.processor() or platform.machine()}
    for label, counts in (("own K", None), ("true K", scenes.n_sources)):
        times = _median_seconds(
            lambda c=counts: sparse_bayesian_learning(scenes.measurements, deployment, config,
                                                      n_sources=c, settings=settings),
            args.repeats, device)
        result[f"{label}: s per scene (batch)"] = statistics.median(times) / args.scenes
        print(f"{label}, batch of {args.scenes}: median {statistics.median(times):.2f} s, "
              f"{1e3 * statistics.median(times) / args.scenes:.1f} ms per scene "
              f"(repeats {', '.join(f'{t:.2f}' for t in times)})", flush=True)
    if args.single:
        one = [scenes.select(slice(i, i + 1)) for i in range(min(args.single, args.scenes))]

        def singly() -> None:
            for scene in one:
                sparse_bayesian_learning(scene.measurements, deployment, config,
                                         settings=settings)

        times = _median_seconds(singly, args.repeats, device)
        result["own K: s per scene (one at a time)"] = statistics.median(times) / len(one)
        print(f"own K, one scene at a time: "
              f"{1e3 * statistics.median(times) / len(one):.1f} ms per scene", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
