"""Scene generation: everything a training step needs, made on the device, nothing on disk.

A scene is its measurements, back-projected fields, source parameters and steering vectors. The
original pipeline generated 280 scenes/s (47/s with its sample covariance and files written;
issue 7). Timed two ways: in batches of the preset's batch size, each from its own seed, as
training draws them; and all `--scenes` in one call, as the validation and test splits are made.

    python -m bench generation [--preset full] [--device auto] [--threads 0] [--repeats 5]
                               [--scenes 10000]
"""

from __future__ import annotations

import statistics

import torch

from bench import _harness as harness
from pipeline import Deployment, generate_scenes, iterate_batches, preset, resolve_device


def main(argv: list[str]) -> None:
    parser = harness.parser(__name__, __doc__)
    parser.add_argument("--preset", default="full")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--scenes", type=int, default=10_000)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    config = preset(args.preset)
    deployment = Deployment.build(config, device)
    harness.header(args, device, n_elements=config.n_elements,
                   n_bs_antennas=config.n_bs_antennas, n_snapshots=config.n_snapshots)
    generate_scenes(config, deployment, 64, 0)  # warm-up

    # As training draws them: batches of config.batch_size, each from its own seed.
    n_loop = args.scenes if device.type == "cuda" else min(args.scenes, 2_048)
    loop: list[float] = []
    for epoch in range(1, args.repeats + 1):
        with harness.timed(device, loop):
            for _ in iterate_batches(config, deployment, "train", n_loop, config.batch_size,
                                     epoch=epoch):
                pass
    # One call for all of them (validation/test splits).
    whole: list[float] = []
    for seed in range(args.repeats):
        with harness.timed(device, whole):
            generate_scenes(config, deployment, args.scenes, seed)
    harness.emit({
        "preset": args.preset, "device": str(device), "batch_size": config.batch_size,
        "scenes_per_s_in_batches_median": round(n_loop / statistics.median(loop)),
        "scenes_in_batches": n_loop,
        "seconds_for_all_scenes_in_one_call_median": round(statistics.median(whole), 3),
        "scenes_per_s_in_one_call_median": round(args.scenes / statistics.median(whole)),
        "scenes": args.scenes,
        "original_scenes_per_s": 280,
    })
