"""Tune coded SBL's grid, iterations and count rule on VALIDATION scenes (never test scenes).

Two stages, each on the same validation scenes of the preset (the `val` stream of
`split_seeds(config.seed)`, disjoint from the train and test streams):

1. search: one knob at a time away from the defaults of `SblSettings` (grid spacing, inverse-range
   points, iterations, pruning), each scored with the TRUE K (success at >= 10 dB and overall)
   and its cost per scene with one CPU thread, so that the search is chosen apart from the count
   (with --own-count, also with SBL's own count).
2. count: SBL's own K with `count_threshold` (and `count_slope`) swept; K accuracy and success
   per SNR bin. The candidates and their drop path (down to one source) are computed once
   (`pipeline._sbl._count` with `path`); each threshold then stops each scene's path where the
   production code stops it, so every threshold is scored exactly and at no extra cost.

    python -m bench sbl_tune [--preset medium] [--scenes 300] [--stage search count] [--own-count]
                             [--thresholds 4 6 8 10 14 20] [--slopes 0] [--out sbl_tune.json]

Each configuration prints one JSON line as it finishes; --out collects them.
"""

from __future__ import annotations

import dataclasses
import json
import time

import torch

from bench import _harness as harness
from pipeline import (
    Localization,
    SblSettings,
    coded_dictionary,
    load_split,
    localization_metrics,
    music_grid,
    sparse_bayesian_learning,
)

# SBL's count rule, step by step: private to pipeline._sbl, and staying there for this sweep.
from pipeline._sbl import _candidates, _count, _stop_path, sbl_grid_config

# One knob at a time away from the defaults.
SEARCH_VARIANTS: dict[str, dict] = {
    "default": {},
    "grid 4 deg": {"grid_step_deg": 4.0},
    "grid 2.5 deg": {"grid_step_deg": 2.5},
    "4 ranges": {"n_grid_range": 4},
    "9 ranges": {"n_grid_range": 9},
    "12 iterations": {"n_iterations": 12},
    "40 iterations": {"n_iterations": 40},
    "keep 150": {"n_kept": 150},
    "keep 600": {"n_kept": 600},
    "prune after 2": {"prune_after": 2},
    "4 refine rounds": {"refine_rounds": 4},
    "12 refine rounds": {"refine_rounds": 12},
    "no grid sweep": {"grid_sweeps": 0},
    "2 grid sweeps": {"grid_sweeps": 2},
}
SNR_BINS = ((-5.0, 0.0), (0.0, 5.0), (5.0, 10.0), (10.0, 15.0), (15.0, 20.01))


def _score(found, scenes, k_hat, config) -> dict:
    row = {}
    high = scenes.snr_db >= 10.0
    metrics = localization_metrics(found, scenes, k_hat, config=config)
    row["success"] = metrics["success_rate"]
    row["k_accuracy"] = metrics["k_accuracy"]
    for low, top in SNR_BINS:
        inside = ((scenes.snr_db >= low) & (scenes.snr_db < top)).nonzero().squeeze(-1)
        part = found.select(inside)
        m = localization_metrics(part, scenes.select(inside), k_hat[inside], config=config)
        row[f"success {low:g}..{min(top, 20):g}"] = m["success_rate"]
        row[f"k_accuracy {low:g}..{min(top, 20):g}"] = m["k_accuracy"]
    index = high.nonzero().squeeze(-1)
    m = localization_metrics(found.select(index), scenes.select(index), k_hat[index],
                             config=config)
    row["success >=10dB"] = m["success_rate"]
    row["n >=10dB"] = int(index.numel())
    return row


def _run(name, settings, scenes, deployment, config, *, true_k: bool) -> dict:
    started = time.perf_counter()
    found = sparse_bayesian_learning(scenes.measurements, deployment, config,
                                     n_sources=scenes.n_sources if true_k else None,
                                     settings=settings)
    seconds = time.perf_counter() - started
    k_hat = scenes.n_sources if true_k else found.n_sources
    return {"variant": name, "true_k": true_k, "settings": dataclasses.asdict(settings),
            "seconds_per_scene": seconds / scenes.size,
            **_score(found, scenes, k_hat, config)}


def _count_paths(scenes, deployment, config, settings: SblSettings, chunk: int = 32) -> list:
    """Per chunk of scenes: the drop path of `_count` from max_sources candidates."""
    grid_config = sbl_grid_config(config, settings)
    grid = music_grid(grid_config, deployment)
    atoms_conj, _ = coded_dictionary(grid_config, deployment)
    paths = []
    with torch.no_grad():
        for start in range(0, scenes.size, chunk):
            y = scenes.measurements[start:start + chunk]
            state = _candidates(y, None, deployment, grid, atoms_conj, config.max_sources,
                                settings)
            path: list = []
            _count(state, y, deployment, grid, settings, path=path)
            paths.append(path)
    return paths


def _stop(paths: list, settings: SblSettings) -> Localization:
    """Each scene's state where the count rule of `settings` stops its drop path."""
    parts = []
    for path in paths:
        state = _stop_path(path, settings)
        mask, point = state.active, state.points
        parts.append(Localization(point[..., 0] * mask, point[..., 1] * mask,
                                  (1.0 / point[..., 2]) * mask, mask, mask.float()))
    return Localization.cat(parts)


def main(argv: list[str]) -> None:
    parser = harness.parser(__name__, __doc__)
    parser.add_argument("--preset", default="medium")
    parser.add_argument("--scenes", type=int, default=300, help="validation scenes")
    parser.add_argument("--stage", nargs="+", default=["search", "count"],
                        choices=["search", "count"])
    parser.add_argument("--variants", nargs="*", default=None,
                        help="search variants to run [default: all]")
    parser.add_argument("--thresholds", type=float, nargs="+",
                        default=[4.0, 6.0, 8.0, 10.0, 14.0, 20.0])
    parser.add_argument("--slopes", type=float, nargs="+", default=[0.0],
                        help="count_slope values, each tried with every threshold")
    parser.add_argument("--own-count", action="store_true",
                        help="score each search variant with SBL's own count as well")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    config, deployment = harness.cpu_system(args)
    scenes = load_split(config, deployment, "val", args.scenes, chunk=250)
    results = []

    def report(row: dict) -> None:
        results.append(row)
        harness.emit(row)

    if "search" in args.stage:
        for name, changes in SEARCH_VARIANTS.items():
            if args.variants and name not in args.variants:
                continue
            settings = SblSettings(**changes)
            report(_run(name, settings, scenes, deployment, config, true_k=True))
            if args.own_count:
                report(_run(name, settings, scenes, deployment, config, true_k=False))
    if "count" in args.stage:
        started = time.perf_counter()
        paths = _count_paths(scenes, deployment, config, SblSettings())
        seconds = time.perf_counter() - started
        for slope in args.slopes:
            for threshold in args.thresholds:
                settings = SblSettings(count_threshold=threshold, count_slope=slope)
                found = _stop(paths, settings)
                report({"variant": f"count_threshold {threshold:g} slope {slope:g}",
                        "true_k": False, "settings": dataclasses.asdict(settings),
                        "seconds_per_scene (whole path)": seconds / scenes.size,
                        **_score(found, scenes, found.n_sources, config)})
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"preset": args.preset, "split": "val", "n_scenes": args.scenes,
                       "threads": args.threads, "results": results}, handle, indent=1)
