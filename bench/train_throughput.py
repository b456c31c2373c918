"""Training throughput: scenes per second of full training steps, for the quick and full presets.

A step is everything training does per batch: scene generation on the device, forward pass, loss
(all four covariance fixes), backward, clipping, AdamW and the schedule. Validation is timed
separately (it runs MUSIC on every validation scene). Reports medians over repeats.

`--compile MODE ...` measures each preset once per mode: `none` (eager, as training runs), or a
`torch.compile` mode (`default`, `reduce-overhead`: CUDA graphs on a GPU, `max-autotune`) applied
to the convolutional trunk (the residual blocks), the bulk of the network's arithmetic. The first
pass, which compiles, is timed apart (`first_pass_s`) and left out of the rates.

    python bench/train_throughput.py [--device auto] [--presets quick full] [--steps 20]
        [--compile none default]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from pipeline import preset, resolve_device
from pipeline._data import iterate_batches, load_split
from pipeline._losses import compute_loss
from pipeline._model import build_model, count_parameters
from pipeline._physics import Deployment
from pipeline._train import _autocast, make_optimizer, validate


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, device: torch.device, steps: int, repeats: int,
            compile_mode: str = "none") -> dict:
    config = preset(name)
    deployment = Deployment.build(config, device)
    model = build_model(config, deployment)
    if compile_mode != "none":
        model.blocks = torch.compile(model.blocks, mode=compile_mode)
    optimizer, scheduler = make_optimizer(model, config)
    n_scenes = steps * config.batch_size

    def one_pass(epoch: int) -> float:
        _sync(device)
        start = time.perf_counter()
        for batch in iterate_batches(config, deployment, "train", n_scenes, config.batch_size,
                                     epoch=epoch):
            with _autocast(config, device):
                output = model(batch.measurements, batch.fields)
            terms, _ = compute_loss(output, batch, config)
            optimizer.zero_grad(set_to_none=True)
            terms.total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
        _sync(device)
        return n_scenes / (time.perf_counter() - start)

    start = time.perf_counter()
    one_pass(0)  # warm-up (and compilation)
    first_pass_s = time.perf_counter() - start
    rates = [one_pass(epoch) for epoch in range(1, repeats + 1)]
    val = load_split(config, deployment, "val", min(config.n_val, 300))
    validate(model, val, config, deployment)  # warm-up (a compiled trunk compiles again here)
    val_times = []
    for _ in range(max(1, repeats // 2)):
        _sync(device)
        start = time.perf_counter()
        validate(model, val, config, deployment)
        _sync(device)
        val_times.append(val.size / (time.perf_counter() - start))
    return {
        "preset": name, "device": str(device), "compile": compile_mode,
        "first_pass_s": round(first_pass_s, 2), "batch_size": config.batch_size,
        "parameters": count_parameters(model), "n_elements": config.n_elements,
        "train_scenes_per_s_median": statistics.median(rates),
        "train_scenes_per_s_all": [round(r, 1) for r in rates],
        "validation_scenes_per_s_median": statistics.median(val_times),
        "epoch_seconds_estimate": config.n_train / statistics.median(rates)
        + config.n_val / statistics.median(val_times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--presets", nargs="+", default=["quick", "full"])
    parser.add_argument("--steps", type=int, default=20, help="optimisation steps per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--compile", nargs="+", default=["none"], metavar="MODE",
                        choices=["none", "default", "reduce-overhead", "max-autotune"],
                        help="torch.compile modes of the trunk to measure (none: eager)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(f"# device {device} ({name}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    for preset_name in args.presets:
        for mode in args.compile:
            result = measure(preset_name, device, args.steps, args.repeats, mode)
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
