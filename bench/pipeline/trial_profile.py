"""Where a trial's time goes: data, forward, loss, backward, optimizer, validation, storage.

Runs one trial of a preset as the training loop does: scene generation, the real training step
(`pipeline.TrainStep`, with a timer around each of its phases), the epoch's read back to the host,
validation with MUSIC; each timer is synchronised on CUDA so GPU work lands in the part that
queued it. Alongside, the trial's store traffic (ask, one report and one pruning question per
epoch, tell) against a real Optuna store. The JSON record goes to stdout, a Markdown table of
the same figures to stderr.

    python -m bench trial_profile [--preset quick] [--device auto] [--threads 1] [--epochs 0]
                                  [--storage URL]
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator

import optuna
import torch

from bench import _harness as harness
from pipeline import (
    Deployment,
    TrainStep,
    build_model,
    count_parameters,
    iterate_batches,
    load_split,
    make_optimizer,
    preset,
    resolve_device,
    validate,
)
from storage import open_storage

PARTS = ("data", "forward", "loss", "backward", "optimizer", "validation", "storage")


def main(argv: list[str]) -> None:
    parser = harness.parser(__name__, __doc__)
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=0, help="0: the preset's")
    parser.add_argument("--storage", default="", help="Optuna store URL (default: temp SQLite)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    device = resolve_device(args.device)
    config = preset(args.preset)
    epochs = args.epochs or config.epochs
    seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def part(name: str) -> Iterator[None]:
        spent: list[float] = []
        with harness.timed(device, spent):
            yield
        seconds[name] += spent[0]

    with contextlib.ExitStack() as stack:
        url = args.storage or stack.enter_context(harness.sqlite_store(name="profile.db"))
        harness.header(args, device, store=url.split(":")[0])
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
        step = TrainStep(model, config, device=device)
        val = load_split(config, deployment, "val", config.n_val)
        setup = time.perf_counter() - started
        for epoch in range(1, epochs + 1):
            step.begin_epoch(epoch)
            batches = iterate_batches(config, deployment, "train", config.n_train,
                                      config.batch_size, epoch=epoch)
            while True:
                with part("data"):
                    batch = next(batches, None)
                if batch is None:
                    break
                step(batch, phase=part)
            with part("optimizer"):  # the epoch's read of its loss sums and finiteness flags
                step.end_epoch()
            with part("validation"):
                metrics = validate(model, val, config, deployment)
            with part("storage"):
                trial.report(metrics["composite"], epoch)
                trial.should_prune()
        with part("storage"):
            study.tell(trial, metrics["composite"])
    total = sum(seconds.values())
    harness.emit({"preset": args.preset, "device": str(device), "epochs": epochs,
                  "parameters": count_parameters(model), "n_train": config.n_train,
                  "n_val": config.n_val, "trial_s": round(total, 3), "setup_s": round(setup, 3),
                  "once_per_process_s": round(once, 3),
                  **{f"{p}_s": round(seconds[p], 3) for p in PARTS},
                  **{f"{p}_share": round(seconds[p] / total, 4) for p in PARTS}})
    harness.note("| part | seconds | share |\n|---|---|---|")
    for p in PARTS:
        harness.note(f"| {p} | {seconds[p]:.2f} | {100 * seconds[p] / total:.1f} % |")
    harness.note(f"| trial (without {setup:.2f} s set-up) | {total:.2f} | 100 % |")
