"""Where a trial's time goes: data, forward, loss, backward, optimizer, validation, storage.

Runs one trial of a preset as the training loop does (same functions: scene generation, model,
factor-form loss, AdamW with the schedule, validation with MUSIC), with a timer around each part
(synchronised on CUDA so GPU work lands in the part that queued it), and the trial's store traffic
(ask, one report and one pruning question per epoch, tell) against a real Optuna store.

    python bench/trial_profile.py [--preset quick] [--device auto] [--threads 1] [--storage URL]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import optuna
import torch

from pipeline import preset, resolve_device
from pipeline._data import iterate_batches, load_split
from pipeline._losses import compute_loss
from pipeline._model import build_model, count_parameters
from pipeline._physics import Deployment
from pipeline._train import _autocast, make_optimizer, validate
from storage import open_storage

PARTS = ("data", "forward", "loss", "backward", "optimizer", "validation", "storage")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=0, help="0: the preset's")
    parser.add_argument("--storage", default="", help="Optuna store URL (default: temp SQLite)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    device = resolve_device(args.device)
    config = preset(args.preset)
    epochs = args.epochs or config.epochs
    seconds: dict[str, float] = defaultdict(float)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    class part:  # used as `with part("data"):`
        def __init__(self, name: str) -> None:
            self.name = name

        def __enter__(self) -> None:
            sync()
            self.start = time.perf_counter()

        def __exit__(self, *exc: object) -> None:
            sync()
            seconds[self.name] += time.perf_counter() - self.start

    with tempfile.TemporaryDirectory() as tmp:
        url = args.storage or f"sqlite:///{Path(tmp) / 'profile.db'}"
        # Once per study or per worker process, not per trial: creating the store and the study,
        # and the first optimizer's one-off import of torch._dynamo (seconds).
        started = time.perf_counter()
        study = optuna.create_study(storage=open_storage(url, heartbeat=False),
                                    direction="minimize", study_name=f"profile-{time.time_ns()}",
                                    pruner=optuna.pruners.NopPruner())
        make_optimizer(torch.nn.Linear(1, 1), config)
        once = time.perf_counter() - started
        with part("storage"):
            trial = study.ask()
        started = time.perf_counter()
        deployment = Deployment.build(config, device)
        model = build_model(config, deployment)
        optimizer, scheduler = make_optimizer(model, config)
        val = load_split(config, deployment, "val", config.n_val)
        setup = time.perf_counter() - started
        for epoch in range(1, epochs + 1):
            model.train()
            batches = iterate_batches(config, deployment, "train", config.n_train,
                                      config.batch_size, epoch=epoch)
            while True:
                with part("data"):
                    batch = next(batches, None)
                if batch is None:
                    break
                with part("forward"), _autocast(config, device):
                    output = model(batch.measurements, batch.fields)
                with part("loss"):
                    terms, _ = compute_loss(output, batch, config)
                with part("backward"):
                    optimizer.zero_grad(set_to_none=True)
                    terms.total.backward()
                with part("optimizer"):
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                    optimizer.step()
                    scheduler.step()
            with part("validation"):
                metrics = validate(model, val, config, deployment)
            with part("storage"):
                trial.report(metrics["composite"], epoch)
                trial.should_prune()
        with part("storage"):
            study.tell(trial, metrics["composite"])
    total = sum(seconds.values())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(f"# {args.preset} ({count_parameters(model):,} parameters, {config.n_train:,} + "
          f"{config.n_val:,} scenes x {epochs} epochs), device {device} ({name}), "
          f"{torch.get_num_threads()} threads, store {url.split(':')[0]}")
    print(json.dumps({"preset": args.preset, "device": str(device), "epochs": epochs,
                      "trial_s": round(total, 3), "setup_s": round(setup, 3),
                      "once_per_process_s": round(once, 3),
                      **{f"{p}_s": round(seconds[p], 3) for p in PARTS},
                      **{f"{p}_share": round(seconds[p] / total, 4) for p in PARTS}}))
    print("| part | seconds | share |\n|---|---|---|")
    for p in PARTS:
        print(f"| {p} | {seconds[p]:.2f} | {100 * seconds[p] / total:.1f} % |")
    print(f"| trial (without {setup:.2f} s set-up) | {total:.2f} | 100 % |")


if __name__ == "__main__":
    main()
