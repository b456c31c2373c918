"""Do early epochs rank trials? Learning curves of configs drawn at random from the default space.

Trains `--configs` configs of a preset drawn by a seeded RandomSampler from `hpo run`'s default
search space (no sampler steering them together, unlike a study), each for the preset's epochs on
one thread with the real training step (`pipeline.TrainStep`), and scores every epoch's model on
the validation scenes twice: the weights as they are (what a trial reports) and an exponential
moving average of them (EMA, updated after every step, half-life in epochs given by
`--ema-half-life`; weight averaging is the usual remedy for noisy early checkpoints). Records, for
each epoch, the Spearman rank correlation of that epoch's composite with the final composite, for
both; a pruner can only be as good as these. Runs configs in `--processes` processes.

    python -m bench early_epochs [--preset quick] [--configs 64] [--processes 2]
                                 [--ema-half-life 0.25] [--json FILE]
"""

from __future__ import annotations

import copy
import json
import math
import multiprocessing
from pathlib import Path

import numpy as np

from bench import _harness as harness
from bench.studies._ranks import ranks, spearman


def curve(job: tuple[str, int, float]) -> dict:
    """One config's validation composites after each epoch, raw and of the EMA weights."""
    preset_name, index, half_life = job
    import optuna
    import torch

    from hpo import default_space, suggest_config
    from pipeline import (
        Deployment,
        TrainStep,
        build_model,
        iterate_batches,
        load_split,
        preset,
        validate,
    )

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    base = preset(preset_name)
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1000 + index)).ask()
    config = suggest_config(trial, default_space(base), base)
    device = torch.device("cpu")
    torch.manual_seed(config.seed)
    deployment = Deployment.build(config, device)
    model = build_model(config, deployment)
    step = TrainStep(model, config, device=device)
    ema = copy.deepcopy(model)
    steps_per_epoch = math.ceil(config.n_train / config.batch_size)  # as training's
    decay = 0.5 ** (1 / (half_life * steps_per_epoch))

    @torch.no_grad()
    def average() -> None:
        for averaged, current in zip(ema.parameters(), model.parameters(), strict=True):
            averaged.mul_(decay).add_(current.detach(), alpha=1 - decay)
        for averaged, current in zip(ema.buffers(), model.buffers(), strict=True):
            averaged.copy_(current)

    val = load_split(config, deployment, "val", config.n_val)
    raw, averaged = [], []
    for epoch in range(1, config.epochs + 1):
        step.begin_epoch(epoch)
        for batch in iterate_batches(config, deployment, "train", config.n_train,
                                     config.batch_size, epoch=epoch):
            step(batch)
            average()
        step.end_epoch()
        raw.append(validate(model, val, config, deployment)["composite"])
        averaged.append(validate(ema, val, config, deployment)["composite"])
    return {"index": index, "params": trial.params, "raw": raw, "ema": averaged}


def main(argv: list[str]) -> None:
    parser = harness.parser(__name__, __doc__)
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--configs", type=int, default=64)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--ema-half-life", type=float, default=0.25, help="in epochs")
    parser.add_argument("--json", type=Path, help="also write every curve here")
    args = parser.parse_args(argv)
    harness.header(args)
    jobs = [(args.preset, i, args.ema_half_life) for i in range(args.configs)]
    with multiprocessing.get_context("spawn").Pool(args.processes) as pool:
        curves = pool.map(curve, jobs, chunksize=1)
    finals = [c["raw"][-1] for c in curves]
    final = ranks(finals)
    epochs = len(curves[0]["raw"])
    harness.emit({
        "preset": args.preset, "configs": len(curves),
        "spearman_epoch_vs_final": {e + 1: spearman(ranks([c["raw"][e] for c in curves]), final)
                                    for e in range(epochs)},
        "ema_spearman_epoch_vs_final": {e + 1: spearman(ranks([c["ema"][e] for c in curves]),
                                                        final)
                                        for e in range(epochs)},
        "best_final": round(min(finals), 4), "median_final": round(float(np.median(finals)), 4),
    })  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(curves))
