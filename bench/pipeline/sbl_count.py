"""Inference cost of the SBL count network per scene (model sbl_count), one CPU thread by default.

What `hpo evaluate` runs for the learned row, end to end: the SBL front end (SBL, candidates, the
drop path), the count network, SBL's K_hat peaks refined again with K_hat active (and each
range then chosen for the success box, `range_for_success`), R_pred and
R_blend, and MUSIC on R_blend with K_hat. Each stage is timed on a batch of scenes of the preset
(`--repeats` times after one warm-up); records the median seconds per scene of each stage and of
the whole. The network's weights do not change its own cost (a fresh one is used), but the
refinement's cost grows with K_hat (the whole-grid sweep works source by source), and a fresh
network's K_hat is arbitrary: the refinement therefore runs with the scenes' true K, which a
trained network's K_hat matches on about 73 % of `medium` test scenes. Progress lines go to
stderr.

    python -m bench sbl_count [--preset medium] [--scenes 64] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import contextlib
import statistics

import torch

from bench import _harness as harness
from pipeline import build_model
from pipeline._frontend import front_end, refined_sources
from pipeline._losses import covariances
from pipeline._music import music_localize
from pipeline._sbl_net import path_features

STAGES = ("front end", "network", "refine K_hat", "R_blend + MUSIC")


def main(argv: list[str]) -> None:
    parser = harness.parser(__name__, __doc__)
    harness.add_scene_options(parser, repeats=3)
    args = parser.parse_args(argv)
    device, config, deployment, scenes = harness.timing_scenes(args)
    torch.manual_seed(0)
    model = build_model(config, deployment).eval()
    harness.header(args, device)

    def once(times: dict[str, list[float]] | None) -> None:
        def stage(name: str):
            if times is None:
                return contextlib.nullcontext()
            return harness.timed(device, times[name])

        with torch.no_grad():
            with stage("front end"):
                front, powers = front_end(scenes.measurements, deployment, config,
                                          keep_powers=True)
            with stage("network"):
                model.decide(path_features(front))[2].argmax(-1)
            k_hat = scenes.n_sources  # a trained network's K_hat, as far as the cost goes
            with stage("refine K_hat"):
                points, power, active = refined_sources(
                    scenes.measurements, k_hat, powers, deployment, config,
                    for_success=config.range_for_success)
            with stage("R_blend + MUSIC"):
                output = model.output(points, power, active, k_hat)  # logits unused
                mats = covariances(output, scenes, config)
                music_localize(mats.blend, k_hat, deployment, config)

    once(None)  # warm-up: dictionaries, bases, MUSIC's grid
    times: dict[str, list[float]] = {name: [] for name in STAGES}
    for _ in range(args.repeats):
        once(times)
    result = {"preset": args.preset, "device": str(device), "threads": args.threads,
              "scenes": args.scenes, "repeats": args.repeats}
    total = 0.0
    for name in STAGES:
        per_scene = statistics.median(times[name]) / args.scenes
        total += per_scene
        result[f"{name}: s per scene"] = per_scene
        harness.note(f"{name}: {1e3 * per_scene:.1f} ms per scene")
    result["total: s per scene"] = total
    harness.note(f"total: {1e3 * total:.1f} ms per scene (target <= 150 ms, issue 16)")
    harness.emit(result)

