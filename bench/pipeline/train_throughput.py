"""Training throughput: scenes per second of the real training step, for presets quick and full.

A step is `pipeline.TrainStep`, what training runs per batch: the network under autocast, the loss
(all four covariance fixes), backward through the gradient scaler, clipping, the finiteness watch,
AdamW and the schedule; scene generation on the device is timed with it, and so is the epoch's
one read back to the host (`end_epoch`). Validation is timed separately (it runs MUSIC on every
validation scene). Reports medians over repeats.

`--compile MODE ...` measures each preset once per mode: `none` (eager, as training runs), or a
`torch.compile` mode (`default`, `reduce-overhead`: CUDA graphs on a GPU, `max-autotune`) applied
to the convolutional trunk (the residual blocks), the bulk of the network's arithmetic. The first
pass, which compiles, is timed apart (`first_pass_s`) and left out of the rates.

    python -m bench train_throughput [--device auto] [--presets quick full] [--steps 20]
                                     [--repeats 5] [--threads 0] [--compile none default]
"""

from __future__ import annotations

import statistics
import time

import torch

from bench import _harness as harness
from pipeline import (
    Deployment,
    TrainStep,
    build_model,
    count_parameters,
    iterate_batches,
    load_split,
    preset,
    resolve_device,
    validate,
)


def measure(name: str, device: torch.device, steps: int, repeats: int,
            compile_mode: str = "none") -> dict:
    config = preset(name)
    deployment = Deployment.build(config, device)
    model = build_model(config, deployment)
    if compile_mode != "none":
        model.blocks = torch.compile(model.blocks, mode=compile_mode)
    step = TrainStep(model, config, device=device)
    n_scenes = steps * config.batch_size

    def one_pass(epoch: int) -> float:
        seconds: list[float] = []
        with harness.timed(device, seconds):
            step.begin_epoch(epoch)
            for batch in iterate_batches(config, deployment, "train", n_scenes,
                                         config.batch_size, epoch=epoch):
                step(batch)
            step.end_epoch()
        return n_scenes / seconds[0]

    start = time.perf_counter()
    one_pass(1)  # warm-up (and compilation)
    first_pass_s = time.perf_counter() - start
    rates = [one_pass(epoch) for epoch in range(2, repeats + 2)]
    val = load_split(config, deployment, "val", min(config.n_val, 300))
    validate(model, val, config, deployment)  # warm-up (a compiled trunk compiles again here)
    val_times: list[float] = []
    for _ in range(max(1, repeats // 2)):
        with harness.timed(device, val_times):
            validate(model, val, config, deployment)
    val_rates = [val.size / s for s in val_times]
    return {
        "preset": name, "device": str(device), "compile": compile_mode,
        "first_pass_s": round(first_pass_s, 2), "batch_size": config.batch_size,
        "parameters": count_parameters(model), "n_elements": config.n_elements,
        "train_scenes_per_s_median": statistics.median(rates),
        "train_scenes_per_s_all": [round(r, 1) for r in rates],
        "validation_scenes_per_s_median": statistics.median(val_rates),
        "epoch_seconds_estimate": config.n_train / statistics.median(rates)
        + config.n_val / statistics.median(val_rates),
    }  # fmt: skip


def main(argv: list[str]) -> None:
    parser = harness.parser(__name__, __doc__)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--presets", nargs="+", default=["quick", "full"])
    parser.add_argument("--steps", type=int, default=20, help="optimisation steps per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--compile", nargs="+", default=["none"], metavar="MODE",
                        choices=["none", "default", "reduce-overhead", "max-autotune"],
                        help="torch.compile modes of the trunk to measure (none: eager)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    harness.header(args, device)
    for preset_name in args.presets:
        for mode in args.compile:
            harness.emit(measure(preset_name, device, args.steps, args.repeats, mode))
