"""Cost of coded SBL per scene (`pipeline.sparse_bayesian_learning`), one CPU thread by default.

Times `sparse_bayesian_learning` on a batch of scenes of the preset, with its own count (as
`hpo evaluate` runs it) and with the true count, `--repeats` times after one warm-up (which
builds the cached dictionary and basis); records the median seconds per scene of each, and the
same for scenes one at a time (a latency, not a throughput). Progress lines go to stderr.

    python -m bench sbl [--preset medium] [--scenes 64] [--single 8] [--repeats 5]
                        [--threads 1] [--device cpu]
"""

from __future__ import annotations

import statistics

import torch

from bench import _harness as harness
from pipeline import SblSettings, sparse_bayesian_learning


def _median_seconds(run, repeats: int, device: torch.device) -> list[float]:
    run()  # warm-up: caches, allocator
    times: list[float] = []
    for _ in range(repeats):
        with harness.timed(device, times):
            run()
    return times


def main(argv: list[str]) -> None:
    parser = harness.parser(__name__, __doc__)
    harness.add_scene_options(parser, repeats=5)
    parser.add_argument("--single", type=int, default=8, help="scenes timed one at a time")
    args = parser.parse_args(argv)
    device, config, deployment, scenes = harness.timing_scenes(args)
    settings = SblSettings()
    harness.header(args, device)
    result = {"preset": args.preset, "device": str(device), "threads": args.threads,
              "scenes": args.scenes, "repeats": args.repeats, "settings": settings.__dict__}
    for label, counts in (("own K", None), ("true K", scenes.n_sources)):
        times = _median_seconds(
            lambda c=counts: sparse_bayesian_learning(scenes.measurements, deployment, config,
                                                      n_sources=c, settings=settings),
            args.repeats, device)
        result[f"{label}: s per scene (batch)"] = statistics.median(times) / args.scenes
        harness.note(f"{label}, batch of {args.scenes}: median {statistics.median(times):.2f} s, "
                     f"{1e3 * statistics.median(times) / args.scenes:.1f} ms per scene "
                     f"(repeats {', '.join(f'{t:.2f}' for t in times)})")
    if args.single:
        one = [scenes.select(slice(i, i + 1)) for i in range(min(args.single, args.scenes))]

        def singly() -> None:
            for scene in one:
                sparse_bayesian_learning(scene.measurements, deployment, config,
                                         settings=settings)

        times = _median_seconds(singly, args.repeats, device)
        result["own K: s per scene (one at a time)"] = statistics.median(times) / len(one)
        harness.note(f"own K, one scene at a time: "
                     f"{1e3 * statistics.median(times) / len(one):.1f} ms per scene")
    harness.emit(result)
