"""Do early epochs rank trials? Learning curves of configs drawn at random from the default space.

Trains `--configs` configs of a preset drawn by a seeded RandomSampler from `hpo run`'s default
search space (no sampler steering them together, unlike a study), each for the preset's epochs on
one thread, and scores every epoch's model on the validation scenes twice: the weights as they are
(what a trial reports) and an exponential moving average of them (EMA, half-life in epochs given by
`--ema-half-life`; weight averaging is the usual remedy for noisy early checkpoints). Prints, for
each epoch, the Spearman rank correlation of that epoch's composite with the final composite, for
both; a pruner can only be as good as these. Runs configs in `--processes` processes.

    python bench/early_epochs.py [--preset quick] [--configs 64] [--processes 2]
                                 [--ema-half-life 0.25] [--json FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
from pathlib import Path

import numpy as np
from pruning import ranks, spearman  # bench/pruning.py: one rank correlation for both benches


def curve(args: tuple[str, int, float]) -> dict:
    preset_name, index, half_life = args
    import optuna
    import torch

    from hpo._search_space import default_space, suggest_config
    from pipeline import _train as training
    from pipeline import preset
    from pipeline._data import load_split
    from pipeline._model import build_model
    from pipeline._physics import Deployment

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    base = preset(preset_name)
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1000 + index)).ask()
    config = suggest_config(trial, default_space(base), base)
    device = torch.device("cpu")
    torch.manual_seed(config.seed)
    deployment = Deployment.build(config, device)
    model = build_model(config, deployment)
    optimizer, scheduler = training.make_optimizer(model, config)
    scaler = training._grad_scaler(config, device)
    ema = copy.deepcopy(model)
    decay = 0.5 ** (1 / (half_life * training.steps_per_epoch(config)))
    step = scheduler.step

    def step_and_average(*a, **k):  # the scheduler steps once per optimisation step
        step(*a, **k)
        with torch.no_grad():
            for averaged, current in zip(ema.parameters(), model.parameters()):
                averaged.mul_(decay).add_(current.detach(), alpha=1 - decay)
            for averaged, current in zip(ema.buffers(), model.buffers()):
                averaged.copy_(current)

    scheduler.step = step_and_average
    val = load_split(config, deployment, "val", config.n_val)
    raw, averaged = [], []
    for epoch in range(1, config.epochs + 1):
        training._train_epoch(model, optimizer, scheduler, scaler, config, deployment, device,
                              epoch)  # fmt: skip
        raw.append(training.validate(model, val, config, deployment)["composite"])
        averaged.append(training.validate(ema, val, config, deployment)["composite"])
    return {"index": index, "params": trial.params, "raw": raw, "ema": averaged}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--configs", type=int, default=64)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--ema-half-life", type=float, default=0.25, help="in epochs")
    parser.add_argument("--json", type=Path, help="also write every curve here")
    args = parser.parse_args()
    jobs = [(args.preset, i, args.ema_half_life) for i in range(args.configs)]
    with multiprocessing.get_context("spawn").Pool(args.processes) as pool:
        curves = pool.map(curve, jobs, chunksize=1)
    finals = [c["raw"][-1] for c in curves]
    final = ranks(finals)
    epochs = len(curves[0]["raw"])
    result = {
        "preset": args.preset, "configs": len(curves),
        "spearman_epoch_vs_final": {e + 1: spearman(ranks([c["raw"][e] for c in curves]), final)
                                    for e in range(epochs)},
        "ema_spearman_epoch_vs_final": {e + 1: spearman(ranks([c["ema"][e] for c in curves]),
                                                        final)
                                        for e in range(epochs)},
        "best_final": round(min(finals), 4), "median_final": round(float(np.median(finals)), 4),
    }  # fmt: skip
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(curves))


if __name__ == "__main__":
    main()
