"""Scene generation: everything a training step needs (measurements, back-projected fields, source
parameters, steering vectors), made on the device in the loop, nothing on disk.

The original pipeline generated 280 scenes/s (47/s with its sample covariance and files written;
issue 7). Targets: >= 5,600 scenes/s on the 2-core CPU, 10,000 scenes in < 1 s on a GPU.

    python bench/generation.py [--preset full] [--device auto] [--threads 0] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from pipeline import preset, resolve_device
from pipeline._data import generate_scenes, iterate_batches
from pipeline._physics import Deployment


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="full")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--scenes", type=int, default=10_000)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    config = preset(args.preset)
    deployment = Deployment.build(config, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(f"# {args.preset}: N={config.n_elements}, M={config.n_bs_antennas}, "
          f"L={config.n_snapshots}; device {device} ({name}), {torch.get_num_threads()} threads")
    generate_scenes(config, deployment, 64, 0)  # warm-up

    def timed(make) -> float:
        _sync(device)
        start = time.perf_counter()
        make()
        _sync(device)
        return time.perf_counter() - start

    # As training draws them: batches of config.batch_size, each from its own seed.
    n_loop = args.scenes if device.type == "cuda" else min(args.scenes, 2_048)
    loop = [timed(lambda epoch=epoch: [b for b in iterate_batches(
        config, deployment, "train", n_loop, config.batch_size, epoch=epoch)])
        for epoch in range(1, args.repeats + 1)]
    # One call for all of them (validation/test splits).
    whole = [timed(lambda seed=seed: generate_scenes(config, deployment, args.scenes, seed))
             for seed in range(args.repeats)]
    print(json.dumps({
        "preset": args.preset, "device": str(device), "batch_size": config.batch_size,
        "scenes_per_s_in_batches_median": round(n_loop / statistics.median(loop)),
        "scenes_in_batches": n_loop,
        "seconds_for_all_scenes_in_one_call_median": round(statistics.median(whole), 3),
        "scenes_per_s_in_one_call_median": round(args.scenes / statistics.median(whole)),
        "scenes": args.scenes,
        "original_scenes_per_s": 280,
    }))


if __name__ == "__main__":
    main()
