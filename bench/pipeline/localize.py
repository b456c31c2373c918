"""Localizing one scene: source count (MDL) + MUSIC with refinement, time and accuracy.

Against the original pipeline's exhaustive grid (issue 7: 361 x 181 x 7 points, 8.2-8.8 s per
scene for MVDR, 2.1 s for MUSIC with known K): the same MUSIC here on a grid of the original's
resolution (0.5 deg azimuth, 1 deg elevation, 7 ranges) over this system's field of view, without
refinement, scored on the same scenes. Accuracy on R_true (noise-free: what the search itself
loses) and on R_samp (the classical estimate), both with the true K so that only the search
differs; timing with MDL's K, as in use.

    python -m bench localize [--preset full] [--scenes 200] [--timed 30] [--device auto]
                             [--threads 1]
"""

from __future__ import annotations

import statistics

import torch

from bench import _harness as harness
from pipeline import (
    Deployment,
    load_split,
    localization_metrics,
    mdl_estimate,
    music_localize,
    preset,
    replace,
    resolve_device,
)
from pipeline import _covariance as cov  # R_true and R_samp: not in pipeline's face


def _original_resolution(config):
    """This system's field of view at 0.5 deg x 1 deg x 7 ranges, no refinement."""
    return replace(
        config,
        music_grid_azimuth=round(2 * config.azimuth_max_deg / 0.5) + 1,
        music_grid_elevation=round(2 * config.elevation_max_deg / 1.0) + 1,
        music_grid_range=7, music_refine_steps=0,
    )


def _localize_one(r_samp: torch.Tensor, config, deployment, n_snapshots: int):
    k_hat = mdl_estimate(r_samp, n_snapshots, max_sources=config.max_sources)
    return music_localize(r_samp, k_hat, deployment, config)


def main(argv: list[str]) -> None:
    parser = harness.parser(__name__, __doc__)
    parser.add_argument("--preset", default="full")
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--timed", type=int, default=30, help="scenes timed one at a time")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    config = preset(args.preset)
    deployment = Deployment.build(config, device)
    scenes = load_split(config, deployment, "test", args.scenes)
    r_true = cov.true_covariance(scenes.steering, scenes.power)
    r_samp = cov.sample_covariance(scenes.fields)
    original = _original_resolution(config)
    harness.header(args, device, n_elements=config.n_elements, max_sources=config.max_sources,
                   range_max_m=config.range_max_m)

    # Time: one scene per call (MDL + MUSIC + refinement), after a warm-up call.
    results = {}
    for label, cfg in (("refined", config), ("original grid", original)):
        _localize_one(r_samp[:1], cfg, deployment, config.n_snapshots)
        times: list[float] = []
        for index in range(min(args.timed, args.scenes)):
            with harness.timed(device, times):
                _localize_one(r_samp[index:index + 1], cfg, deployment, config.n_snapshots)
        whole: list[float] = []
        with harness.timed(device, whole):
            _localize_one(r_samp, cfg, deployment, config.n_snapshots)
        batched = whole[0] / args.scenes
        grid_points = cfg.music_grid_azimuth * cfg.music_grid_elevation * cfg.music_grid_range
        row = {"grid": f"{cfg.music_grid_azimuth}x{cfg.music_grid_elevation}x"
                       f"{cfg.music_grid_range}", "grid_points": grid_points,
               "refine_steps": cfg.music_refine_steps,
               "ms_per_scene_alone_median": round(1000 * statistics.median(times), 2),
               "ms_per_scene_batched": round(1000 * batched, 2)}
        for source, matrix in (("R_true", r_true), ("R_samp", r_samp)):
            located = music_localize(matrix, scenes.n_sources, deployment, cfg)
            metrics = localization_metrics(located, scenes, scenes.n_sources, config=config)
            for key in ("success_rate", "median_azimuth_deg", "median_elevation_deg",
                        "median_range_m", "inlier_rmse_azimuth_deg",
                        "inlier_rmse_elevation_deg", "inlier_rmse_range_m", "composite"):
                row[f"{source}:{key}"] = round(metrics[key], 4)
        results[label] = row
        harness.emit({"search": label, **row})
    alone = results["refined"]["ms_per_scene_alone_median"]
    harness.emit({
        "original_detection_ms": 8500, "original_music_known_k_ms": 2100,
        "speedup_vs_original_detection": round(8500 / alone, 1),
        "speedup_vs_original_music_known_k": round(2100 / alone, 1),
        "target_ms": 85, "met": alone <= 85,
        "accuracy_at_least_original_grid": all(
            results["refined"][f"{s}:success_rate"]
            >= results["original grid"][f"{s}:success_rate"]
            for s in ("R_true", "R_samp")),
    })
