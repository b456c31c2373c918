"""The training loop: `train(config, *, device, on_epoch_end=None)`, read top to bottom.

Per epoch: fresh (or fixed) training scenes generated on the device, AdamW with a warm-up + cosine
schedule stepped every optimisation step, gradient clipping, bf16 autocast for the network on CUDA
(heads and loss stay float32), then validation on the fixed validation scenes (loss, NMSE, K accuracy,
MUSIC localization on R_blend) and a checkpoint. The callback gets the epoch's metrics; whatever it
raises propagates unchanged (that is how the HPO layer prunes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline import _covariance as cov
from pipeline._config import ExperimentConfig, config_from_dict, config_to_dict
from pipeline._data import SceneBatch, iterate_batches, load_split
from pipeline._errors import CheckpointError, ConfigError, NumericalError
from pipeline._frontend import with_front_end
from pipeline._losses import TERMS, compute_loss
from pipeline._metrics import Localization
from pipeline._model import CovarianceNet, build_model, music_seeds, predicted_count
from pipeline._music import evaluate_covariances
from pipeline._physics import Deployment

CHECKPOINT_NAME = "checkpoint.pt"
BEST_NAME = "best.pt"
_VAL_CHUNK = 256


@dataclass(frozen=True)
class EpochMetrics:
    epoch: int  # 1-based
    train_loss: float
    train_terms: dict[str, float]  # cov, k, aux, det, gap: unweighted batch means over the epoch
    val_loss: float
    val_nmse: float  # NMSE(R_blend, R_true) on the validation scenes
    k_accuracy: float
    rmse_azimuth_deg: float
    rmse_elevation_deg: float
    rmse_range_m: float
    success_rate: float
    composite: float  # SYSTEM.md §5, lower is better; independent of every loss weight
    lr: float  # learning rate after the epoch's last step
    seconds: float  # wall time of the epoch, validation included

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TrainResult:
    config: ExperimentConfig
    history: list[EpochMetrics]
    checkpoint_path: Path | None = None
    resumed_from_epoch: int = 0  # 0 when trained from scratch
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> EpochMetrics:
        return self.history[-1]

    @property
    def best(self) -> EpochMetrics:
        return min(self.history, key=lambda m: m.composite)


def resolve_device(name: str) -> torch.device:
    """'auto' (CUDA when present), 'cpu' or 'cuda'/'cuda:N'; ConfigError when unavailable."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} asked for, but CUDA is not available here")
        return torch.device(name)
    raise ConfigError(f"device must be auto, cpu or cuda, but got {name!r}")


def steps_per_epoch(config: ExperimentConfig) -> int:
    return math.ceil(config.n_train / config.batch_size)


def lr_factor(config: ExperimentConfig, step: int, total_steps: int) -> float:
    """Multiplier of config.lr after `step` optimisation steps: linear warm-up, then cosine to 0.

    Written per optimisation step, and stepped per step by `train`.
    """
    warmup = max(1, round(config.warmup_frac * total_steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, config: ExperimentConfig
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay)
    total = config.epochs * steps_per_epoch(config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(config, step, total))
    return optimizer, scheduler


_AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
# With float16 a gradient scaler skips steps whose scaled gradients overflow; that many skips in a
# row mean the gradients are non-finite for another reason.
_MAX_SKIPPED_STEPS = 20


def _autocast(config: ExperimentConfig, device: torch.device) -> torch.autocast:
    return torch.autocast(device_type=device.type, dtype=_AMP_DTYPES[config.amp_dtype],
                          enabled=config.amp and device.type == "cuda")


def _grad_scaler(config: ExperimentConfig, device: torch.device) -> torch.amp.GradScaler:
    return torch.amp.GradScaler(device.type, enabled=config.amp and device.type == "cuda"
                                and config.amp_dtype == "float16")


class _FiniteWatch:
    """Records, on the device, the first batch whose loss terms or gradient norm are non-finite.

    Checking each step would synchronise the host with the GPU every step; the flags stay on the
    device and `raise_if_bad` reads them once per epoch (the one sync of an epoch, shared with the
    loss means). A bad step poisons the weights, so training cannot go on past it anyway; the
    error names the first bad batch and term.
    """

    def __init__(self, names: list[str], device: torch.device) -> None:
        self.names = names
        self.first_batch = torch.full((), -1, dtype=torch.long, device=device)
        self.first_term = torch.zeros((), dtype=torch.long, device=device)

    def record(self, finite_flags: list[torch.Tensor], batch: int) -> None:
        """finite_flags: one 0-d bool tensor per name, True where that value is finite."""
        finite = torch.stack(finite_flags)
        new = (self.first_batch < 0) & ~finite.all()
        self.first_batch = torch.where(new, batch, self.first_batch)
        self.first_term = torch.where(new, (~finite).long().argmax(), self.first_term)

    def raise_if_bad(self, epoch: int) -> None:
        batch, term_index = torch.stack([self.first_batch, self.first_term]).tolist()  # one read
        if batch >= 0:
            term = self.names[term_index]
            what = "gradient norm" if term == "grad" else f"{term} loss"
            raise NumericalError(f"non-finite {what} at epoch {epoch} batch {batch}",
                                 term=term, epoch=epoch, batch=batch)


STEP_PHASES = ("forward", "loss", "backward", "optimizer")


def _no_phase(name: str) -> contextlib.nullcontext[None]:
    return contextlib.nullcontext()


class TrainStep:
    """The optimisation step training takes per batch, and the epoch's bookkeeping around it.

    Per batch: the network's forward pass under autocast, the loss, backward through the gradient
    scaler, unscaling and clipping, the finiteness watch, the AdamW step, the scaler's update and
    the schedule's step. Loss sums and finiteness flags stay on the device; `end_epoch` reads them
    back to the host once (two reads), so an epoch of any length synchronises with a GPU only
    there. `train` runs exactly this, through `_train_epoch`; the step benchmarks time it.

        step = TrainStep(model, config, device=device)    # optimizer, schedule, scaler made here
        step.begin_epoch(epoch)
        for batch in iterate_batches(...):
            step(batch)
        means = step.end_epoch()    # NumericalError on a non-finite loss or gradient
    """

    def __init__(self, model: CovarianceNet, config: ExperimentConfig, *, device: torch.device,
                 optimizer: torch.optim.Optimizer | None = None,
                 scheduler: torch.optim.lr_scheduler.LambdaLR | None = None,
                 scaler: torch.amp.GradScaler | None = None) -> None:
        if (optimizer is None) != (scheduler is None):
            raise ConfigError("TrainStep takes an optimizer and its scheduler together, but got "
                              f"{optimizer=} and {scheduler=}")
        if optimizer is None:
            optimizer, scheduler = make_optimizer(model, config)
        self.model = model
        self.config = config
        self.device = device
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler if scaler is not None else _grad_scaler(config, device)
        self.epoch = 0

    def begin_epoch(self, epoch: int) -> None:
        """Training mode, and fresh loss sums and finiteness flags for `epoch` (1-based)."""
        self.model.train()
        self.epoch = epoch
        self._sums = torch.zeros(len(TERMS) + 1, device=self.device)
        self._n_batches = 0
        # With float16 a gradient scaler skips steps whose scaled gradients overflow (and lowers
        # the scale); only a run of more than _MAX_SKIPPED_STEPS of them is an error.
        self._watch = _FiniteWatch([*TERMS, "total", "grad"], self.device)
        self._skipped = torch.zeros((), dtype=torch.long, device=self.device)

    def __call__(self, batch: SceneBatch, *,
                 phase: Callable[[str], contextlib.AbstractContextManager[Any]] = _no_phase
                 ) -> None:
        """One optimisation step on `batch`. `phase(name)`, for each name of STEP_PHASES in turn,
        is a context around that part of the step (a profiler's timers; none by default)."""
        model, config, optimizer, scaler = self.model, self.config, self.optimizer, self.scaler
        with phase("forward"), _autocast(config, self.device):
            output = model(batch.measurements, batch.fields, batch.frontend)
        with phase("loss"):
            terms, _ = compute_loss(output, batch, config)
            total = terms.total
            if config.fault_nonfinite_epoch == self.epoch:
                total = total * float("nan")  # injected fault, for tests of the HPO layer
        with phase("backward"):
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
        with phase("optimizer"):
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            grad_ok = torch.isfinite(grad_norm)
            if scaler.is_enabled():
                self._skipped = torch.where(grad_ok, 0, self._skipped + 1)
                grad_ok = self._skipped <= _MAX_SKIPPED_STEPS
            self._watch.record(
                [*(torch.isfinite(v) for v in (*terms.as_dict().values(), total)), grad_ok],
                self._n_batches)
            scaler.step(optimizer)
            scaler.update()
            self.scheduler.step()
            self._sums += torch.stack([total.detach(),
                                       *(t.detach() for t in terms.as_dict().values())])
        self._n_batches += 1

    def end_epoch(self) -> dict[str, float]:
        """The epoch's mean loss terms ("total" and TERMS); NumericalError if any step of it had a
        non-finite loss term or gradient norm. The epoch's only reads back to the host."""
        self._watch.raise_if_bad(self.epoch)
        means = (self._sums / max(1, self._n_batches)).tolist()
        return {"total": means[0], **dict(zip(TERMS, means[1:]))}


def _train_epoch(model: CovarianceNet, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LambdaLR, scaler: torch.amp.GradScaler,
                 config: ExperimentConfig, deployment: Deployment, device: torch.device,
                 epoch: int, fixed: SceneBatch | None = None) -> dict[str, float]:
    step = TrainStep(model, config, device=device, optimizer=optimizer, scheduler=scheduler,
                     scaler=scaler)
    step.begin_epoch(epoch)
    for batch in _epoch_batches(config, deployment, epoch, fixed):
        step(batch)
    return step.end_epoch()


def _epoch_batches(config: ExperimentConfig, deployment: Deployment, epoch: int,
                   fixed: SceneBatch | None) -> Iterator[SceneBatch]:
    """The epoch's batches: drawn by `iterate_batches`, or a fresh shuffle of a fixed set."""
    if fixed is None:
        yield from iterate_batches(config, deployment, "train", config.n_train,
                                   config.batch_size, epoch=epoch)
        return
    generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
    order = torch.randperm(fixed.size, generator=generator).to(fixed.n_sources.device)
    for start in range(0, fixed.size, config.batch_size):
        yield fixed.select(order[start:start + config.batch_size])


def _fixed_sets(config: ExperimentConfig, deployment: Deployment
                ) -> tuple[SceneBatch | None, SceneBatch]:
    """(the fixed training set, or None to draw batches per epoch; the validation set). Model
    sbl_count's sets carry their front end, computed once per scene and cached."""
    val = load_split(config, deployment, "val", config.n_val)
    if config.model != "sbl_count":
        return None, val
    train_set = load_split(config, deployment, "train", config.n_train)
    return (with_front_end(train_set, deployment, config, "train"),
            with_front_end(val, deployment, config, "val"))


@torch.no_grad()
def validate(model: CovarianceNet, val: SceneBatch, config: ExperimentConfig,
             deployment: Deployment) -> dict[str, float]:
    """Validation loss and NMSE(R_blend, R_true) over every validation scene; K accuracy, MUSIC
    localization on R_blend and the composite score over the first n_val_localize of them."""
    model.eval()
    device = val.fields.device
    totals = torch.zeros(2, device=device)
    blends, k_hats, seeds = [], [], []
    for start in range(0, val.size, _VAL_CHUNK):
        chunk = val.select(slice(start, start + _VAL_CHUNK))
        with _autocast(config, device):
            output = model(chunk.measurements, chunk.fields, chunk.frontend)
        terms, mats = compute_loss(output, chunk, config)
        size = chunk.size
        totals += torch.stack([terms.total * size, terms.cov * size])
        k_hats.append(predicted_count(output))
        if start < config.n_val_localize:
            blends.append(mats.blend.detach())
            seeds.append(music_seeds(model, output))
    k_hat = torch.cat(k_hats)
    n_localize = min(config.n_val_localize, val.size)
    located = val.select(slice(0, n_localize))
    seed = None if seeds[0] is None else Localization.cat(seeds).select(slice(0, n_localize))
    metrics = evaluate_covariances(cov.LowRank.cat(blends).select(slice(0, n_localize)),
                                   k_hat[:n_localize], located,
                                   deployment, config, seeds=seed)
    val_loss, val_nmse = (totals / val.size).tolist()
    return {"val_loss": val_loss, "val_nmse": val_nmse, **metrics}


def _epoch_metrics(epoch: int, train_terms: dict[str, float], val: dict[str, float], lr: float,
                   seconds: float) -> EpochMetrics:
    return EpochMetrics(
        epoch=epoch, train_loss=train_terms["total"],
        train_terms={name: train_terms[name] for name in TERMS},
        val_loss=val["val_loss"], val_nmse=val["val_nmse"], k_accuracy=val["k_accuracy"],
        rmse_azimuth_deg=val["rmse_azimuth_deg"], rmse_elevation_deg=val["rmse_elevation_deg"],
        rmse_range_m=val["rmse_range_m"], success_rate=val["success_rate"],
        composite=val["composite"],
        lr=lr, seconds=seconds,
    )


def save_checkpoint(path: Path, *, config: ExperimentConfig, epoch: int, model: CovarianceNet,
                    optimizer: torch.optim.Optimizer | None = None,
                    scheduler: torch.optim.lr_scheduler.LambdaLR | None = None,
                    scaler: torch.amp.GradScaler | None = None,
                    history: list[EpochMetrics] | None = None) -> None:
    """A plain dict holding everything needed to resume at the end of `epoch`. Atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": 1,
        "config": config_to_dict(config),
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "history": [m.to_dict() for m in (history or [])],
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """The checkpoint dict with `config` rebuilt as an ExperimentConfig."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path}") from None
    except Exception as error:  # a torn or foreign file: say which, once
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from error
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise CheckpointError(f"{path} is not a checkpoint of this pipeline")
    state["config"] = config_from_dict(state["config"])
    return state


def load_model(path: Path, device: torch.device) -> tuple[CovarianceNet, ExperimentConfig,
                                                          Deployment]:
    """A trained network from a checkpoint, in eval mode, with its config and deployment."""
    state = load_checkpoint(path, device)
    config = state["config"]
    deployment = Deployment.build(config, device)
    model = build_model(config, deployment)
    model.load_state_dict(state["model"])
    model.eval()
    return model, config, deployment


def train(config: ExperimentConfig, *, device: torch.device,
          on_epoch_end: Callable[[EpochMetrics], None] | None = None,
          checkpoint_dir: Path | None = None, resume: bool = False,
          timings: dict[str, float] | None = None, save_best: bool = True,
          checkpoint_every_s: float = 0.0) -> TrainResult:
    """Train `config` on `device`; call `on_epoch_end(metrics)` after each epoch's validation.

    With `checkpoint_dir`, the state after every epoch goes to checkpoint_dir/checkpoint.pt and the
    best epoch's (lowest composite) to best.pt (unless `save_best` is False). With
    `checkpoint_every_s` > 0 the state is saved only once that many seconds of training have passed
    since the last save (or the start), and after the last epoch: a resumed run redoes at most that
    much, and short epochs are not slowed by saves no one will read. With `resume=True`
    and a checkpoint of the same config there, training continues at the epoch after it.
    Exceptions from `on_epoch_end` propagate unchanged; a non-finite loss or gradient raises
    NumericalError. A `timings` dict accumulates "checkpoint_s" and "checkpoint_cpu_s", the wall
    and CPU seconds spent writing checkpoints (the caller's overhead, not training).
    """
    torch.manual_seed(config.seed)
    deployment = Deployment.build(config, device)
    model = build_model(config, deployment)
    optimizer, scheduler = make_optimizer(model, config)
    scaler = _grad_scaler(config, device)
    history: list[EpochMetrics] = []
    checkpoint_path = checkpoint_dir / CHECKPOINT_NAME if checkpoint_dir is not None else None

    start_epoch = 1
    if resume and checkpoint_path is not None and checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path, device)
        if state["config"] != config:
            raise CheckpointError(f"{checkpoint_path} holds another config; not resuming from it")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        history = [EpochMetrics(**m) for m in state["history"]]
        start_epoch = state["epoch"] + 1
    resumed_from = start_epoch - 1

    fixed, val = _fixed_sets(config, deployment)
    last_save = time.perf_counter()
    for epoch in range(start_epoch, config.epochs + 1):
        started = time.perf_counter()
        train_terms = _train_epoch(model, optimizer, scheduler, scaler, config, deployment,
                                   device, epoch, fixed)
        val_metrics = validate(model, val, config, deployment)
        metrics = _epoch_metrics(epoch, train_terms, val_metrics, scheduler.get_last_lr()[0],
                                 time.perf_counter() - started)
        history.append(metrics)
        due = epoch == config.epochs or time.perf_counter() - last_save >= checkpoint_every_s
        best = save_best and metrics is min(history, key=lambda m: m.composite)
        if checkpoint_path is not None and (due or best):
            saving, saving_cpu = time.perf_counter(), time.process_time()
            if due:
                save_checkpoint(checkpoint_path, config=config, epoch=epoch, model=model,
                                optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                                history=history)
                last_save = time.perf_counter()
            if best:
                save_checkpoint(checkpoint_path.with_name(BEST_NAME), config=config, epoch=epoch,
                                model=model, history=history)
            if timings is not None:
                timings["checkpoint_s"] = (timings.get("checkpoint_s", 0.0)
                                           + time.perf_counter() - saving)
                timings["checkpoint_cpu_s"] = (timings.get("checkpoint_cpu_s", 0.0)
                                               + time.process_time() - saving_cpu)
        if on_epoch_end is not None:
            on_epoch_end(metrics)
    return TrainResult(config=config, history=history, checkpoint_path=checkpoint_path,
                       resumed_from_epoch=resumed_from)
