"""The physics front end of the SBL count network: coded SBL's candidates and its drop path.

For each scene, coded SBL (`pipeline._sbl`) proposes K_max refined candidates; then, as SBL's
own count does, the source of least likelihood gain is dropped and the rest refined, down to one
source, without any threshold. Stage k of that path (k sources active, k = 1..K_max) is a complete
answer with k sources; its weakest source's gain (nats) and the estimated power-to-noise ratio
are what SBL's count rule thresholds. The network (`pipeline._sbl_net`) reads the whole path and
decides k.

All of this depends on the scenes alone, never on a trial's weights, so a study computes it once
per scene and shares it (`cached_front_end`): a file under the cache directory, keyed by every
config field that shapes the scenes and by SBL's settings, written once under a file lock.

One scene's front end is one float32 row (`FrontEnd.pack` / `FrontEnd.unpack`), so a batch of
them travels as a plain (B, D) tensor beside the measurements.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import multiprocessing
import os
import pickle
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from pipeline._config import ExperimentConfig, config_from_dict, config_to_dict
from pipeline._data import SceneBatch
from pipeline._grid import MusicGrid, music_grid
from pipeline._metrics import Localization, localization_from_points, scene_success
from pipeline._physics import Deployment
from pipeline._pursuit import coded_dictionary
from pipeline._range_decision import ranges_for_success
from pipeline._sbl import (
    SblSettings,
    _candidates,
    _count,
    _sbl_powers,
    _State,
    localization_of_states,
    sbl_grid_config,
)

_logger = logging.getLogger(__name__)
CACHE_ENV = "RIS_HPO_CACHE"  # directory of the front-end cache; default ~/.cache/ris-hpo
FORMAT = 1  # bump when the front end's arithmetic or layout changes: old files are then ignored
# Fields of ExperimentConfig that do not shape the scenes (model, losses, optimisation, counts of
# scenes per split, evaluation): the cache key leaves them out, so trials that differ only in
# them share one file.
_FIELDS_AFTER_SCENES = "model"  # the first field of the model section
_NOT_SCENE_FIELDS = ("n_train", "n_val", "fresh_train")


@dataclass(frozen=True)
class FrontEnd:
    """The drop path of B scenes, stage k-1 holding k active sources (k = 1..K_max).

    points (B, K, K, 3): (azimuth rad, elevation rad, 1/range 1/m) per stage and slot.
    power (B, K, K): each slot's power (measurement units, 0 where inactive).
    active (B, K, K) bool. noise (B, K): the noise estimate of each stage.
    gain (B, K): the weakest active source's likelihood gain at each stage (nats).
    ratio (B, K): log10(mean measurement power / noise estimate) at each stage.
    """

    points: torch.Tensor
    power: torch.Tensor
    active: torch.Tensor
    noise: torch.Tensor
    gain: torch.Tensor
    ratio: torch.Tensor

    @property
    def k_max(self) -> int:
        return self.power.shape[-1]

    def stage(self, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """points (B, K, 3), power (B, K), active (B, K) of each scene's stage with k[b] sources."""
        index = (k.clamp(1, self.k_max) - 1).long()
        rows = torch.arange(index.shape[0], device=index.device)
        return self.points[rows, index], self.power[rows, index], self.active[rows, index]

    def pack(self) -> torch.Tensor:
        """(B, D) float32, D = K (3K + 2K + 3)."""
        n = self.power.shape[0]
        return torch.cat([self.points.reshape(n, -1), self.power.reshape(n, -1),
                          self.active.float().reshape(n, -1), self.noise, self.gain,
                          self.ratio], dim=1).float()

    @staticmethod
    def width(k_max: int) -> int:
        return k_max * (5 * k_max + 3)

    @staticmethod
    def unpack(packed: torch.Tensor, k_max: int) -> FrontEnd:
        n, k = packed.shape[0], k_max
        if packed.shape[1] != FrontEnd.width(k):
            raise ValueError(f"a packed front end for K_max={k} has {FrontEnd.width(k)} columns, "
                             f"but got {packed.shape[1]}")
        parts = torch.split(packed, [3 * k * k, k * k, k * k, k, k, k], dim=1)
        return FrontEnd(points=parts[0].reshape(n, k, k, 3), power=parts[1].reshape(n, k, k),
                        active=parts[2].reshape(n, k, k) > 0.5, noise=parts[3], gain=parts[4],
                        ratio=parts[5])


@dataclass(frozen=True)
class _Operators:
    grid: MusicGrid
    atoms_conj: torch.Tensor


def _operators(config: ExperimentConfig, deployment: Deployment, settings: SblSettings
               ) -> _Operators:
    grid_config = sbl_grid_config(config, settings)
    atoms_conj, _ = coded_dictionary(grid_config, deployment)
    return _Operators(music_grid(grid_config, deployment), atoms_conj)


def _path_of_chunk(y: torch.Tensor, deployment: Deployment, ops: _Operators, k_max: int,
                   settings: SblSettings) -> tuple[FrontEnd, tuple[torch.Tensor, ...]]:
    powers = _sbl_powers(y, ops.atoms_conj, ops.grid, k_max, settings)
    state = _candidates(y, None, deployment, ops.grid, ops.atoms_conj, k_max, settings,
                        powers=powers)
    path: list[tuple[_State, torch.Tensor, torch.Tensor]] = []
    _count(state, y, deployment, ops.grid, settings, path=path)
    path = path[::-1]  # stage k-1 has k active: the path runs from K_max down to 1
    front = FrontEnd(
        points=torch.stack([s.points for s, _, _ in path], 1),
        power=torch.stack([s.power for s, _, _ in path], 1),
        active=torch.stack([s.active for s, _, _ in path], 1),
        noise=torch.stack([s.noise for s, _, _ in path], 1),
        gain=torch.stack([g for _, g, _ in path], 1),
        ratio=torch.stack([r for _, _, r in path], 1),
    )
    return front, powers


@torch.no_grad()
def front_end(measurements: torch.Tensor, deployment: Deployment, config: ExperimentConfig,
              settings: SblSettings | None = None, *, chunk_size: int = 32,
              keep_powers: bool = False) -> tuple[FrontEnd, list[tuple[torch.Tensor, ...]]]:
    """The drop path of every scene of `measurements` (B, L, M); with keep_powers, also SBL's
    (gamma, kept, noise) per chunk, for `refined_sources`."""
    settings = settings or SblSettings()
    ops = _operators(config, deployment, settings)
    y_all = measurements.to(torch.complex64)
    fronts, powers = [], []
    for start in range(0, y_all.shape[0], chunk_size):
        front, chunk_powers = _path_of_chunk(y_all[start:start + chunk_size], deployment, ops,
                                             config.max_sources, settings)
        fronts.append(front)
        if keep_powers:
            powers.append(chunk_powers)
    if not fronts:
        k = config.max_sources
        return FrontEnd.unpack(torch.zeros(0, FrontEnd.width(k)), k), powers
    joined = FrontEnd(*(torch.cat([getattr(f, name) for f in fronts])
                        for name in ("points", "power", "active", "noise", "gain", "ratio")))
    return joined, powers


@torch.no_grad()
def refined_sources(measurements: torch.Tensor, k_hat: torch.Tensor, powers: list[tuple],
                    deployment: Deployment, config: ExperimentConfig,
                    settings: SblSettings | None = None, *, chunk_size: int = 32,
                    for_success: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SBL's k_hat strongest peaks refined with exactly k_hat sources active (the same SBL
    powers as the front end's), then SBL's whole-grid sweeps (`SblSettings.grid_sweeps`), as
    SBL's own answer for a count: points (B, K, 3), power (B, K), active (B, K).
    for_success: then each range chosen for the success box (`ranges_for_success`), which
    SBL's own answer does not do."""
    settings = settings or SblSettings()
    n_chunks = -(-measurements.shape[0] // chunk_size)
    if len(powers) != n_chunks or any(
            part[0].shape[0] != min(chunk_size, measurements.shape[0] - index * chunk_size)
            for index, part in enumerate(powers)):
        raise ValueError(f"powers must come from front_end(..., chunk_size={chunk_size}, "
                         f"keep_powers=True) on the same {measurements.shape[0]} scenes")
    ops = _operators(config, deployment, settings)
    y_all = measurements.to(torch.complex64)
    out = []
    for index, start in enumerate(range(0, y_all.shape[0], chunk_size)):
        part = slice(start, start + chunk_size)
        state = _candidates(y_all[part], k_hat[part].to(y_all.device), deployment, ops.grid,
                            ops.atoms_conj, config.max_sources, settings, powers=powers[index])
        if for_success:
            points, power = ranges_for_success(state.points, state.power, state.active,
                                               state.noise, y_all[part], deployment, config)
            state = replace(state, points=points, power=power)
        out.append(state)
    return (torch.cat([s.points for s in out]), torch.cat([s.power for s in out]),
            torch.cat([s.active for s in out]))


def rule_count(front: FrontEnd, settings: SblSettings | None = None) -> torch.Tensor:
    """SBL's own count read off the drop path (B,): the most sources whose weakest gain clears
    count_threshold + count_slope * log10(P / sigma^2), else 1. Walking the path down from
    K_max, that is the first stage the rule keeps, where `_count` stops (`_stop_path`)."""
    settings = settings or SblSettings()
    # ~(gain < threshold), as `_count` tests it: a NaN gain keeps its stage there too.
    clears = ~(front.gain < settings.count_threshold + settings.count_slope * front.ratio)
    sizes = torch.arange(1, front.k_max + 1, device=front.gain.device)
    return torch.where(clears, sizes, 1).amax(-1)


@torch.no_grad()
def sbl_from_front_end(measurements: torch.Tensor, front: FrontEnd, powers: list[tuple],
                       deployment: Deployment, config: ExperimentConfig,
                       settings: SblSettings | None = None, *, chunk_size: int = 32
                       ) -> Localization:
    """What `sparse_bayesian_learning(measurements, deployment, config, settings=settings)`
    returns, from a front end of the same measurements computed with `front_end(...,
    keep_powers=True)` and the same chunk_size, without running SBL a second time: its count
    read off the drop path (`rule_count`), then (refine_counted) its K_hat peaks refined again
    from the same powers, which is SBL's own arithmetic. The count is the one thing not equal
    by construction: the path refines every scene at every stage, `_count` only the scenes still
    dropping, so their gains can differ in float rounding, and a gain within rounding of the
    threshold could be counted differently (no scene of 2,000 `medium` test scenes was;
    RESULTS.md). Without refine_counted the answer is the path's stage K_hat, equal to SBL's up
    to that rounding."""
    settings = settings or SblSettings()
    k_hat = rule_count(front, settings)
    if settings.refine_counted:
        points, power, active = refined_sources(measurements, k_hat, powers, deployment, config,
                                                settings, chunk_size=chunk_size)
    else:
        points, power, active = front.stage(k_hat)
    states = [(points[start:start + chunk_size], power[start:start + chunk_size],
               active[start:start + chunk_size])
              for start in range(0, measurements.shape[0], chunk_size)]
    return localization_of_states(states, measurements.to(torch.complex64), deployment,
                                  config.max_sources)


_SCENES_PER_PROCESS = 128  # below this many scenes per core, one process does it all


def _packed_part(measurements: torch.Tensor, config: dict, settings: SblSettings | None
                 ) -> torch.Tensor:
    """A pool process's share: its own deployment (the same G and codes: the seed fixes them)."""
    torch.set_num_threads(1)
    rebuilt = config_from_dict(config)
    front, _ = front_end(measurements, Deployment.build(rebuilt), rebuilt, settings)
    return front.pack()


def _compute_packed(measurements: torch.Tensor, deployment: Deployment, config: ExperimentConfig,
                    settings: SblSettings | None) -> torch.Tensor:
    """The packed front end; on a CPU, split over one process per core (SBL's small batched
    solves scale poorly over threads: 0.21 -> 0.16 s per medium scene from 1 to 2 threads).

    Each pool process runs one torch thread; with too few scenes for a pool, this process runs
    them on its own threads. The bits depend on both the thread count and how the scenes are
    batched (on an Intel Xeon here: 2 threads against 1, or parts of 21-22 scenes against chunks
    of 32, move some values in the float rounding), and the cache key records neither: the same
    key can hold slightly different bits from one host or core count to another. Within a
    host, one file is written once and read by every trial."""
    cores = len(os.sched_getaffinity(0))
    workers = min(cores, measurements.shape[0] // _SCENES_PER_PROCESS)
    if measurements.device.type != "cpu" or workers <= 1:
        front, _ = front_end(measurements, deployment, config, settings)
        return front.pack()
    parts = torch.tensor_split(measurements, workers)
    context = multiprocessing.get_context("fork")  # spawn would re-run a script without a main guard
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = [pool.submit(_packed_part, part, config_to_dict(config), settings)
                   for part in parts]
        return torch.cat([future.result() for future in futures])


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ris-hpo")


def cache_key(config: ExperimentConfig, split: str, n_scenes: int,
              settings: SblSettings | None = None) -> str:
    """A name for the front end of the first n_scenes scenes of `split` under `config`."""
    fields = config_to_dict(config)
    names = list(fields)
    scene_fields = {name: fields[name] for name in names[:names.index(_FIELDS_AFTER_SCENES)]
                    if name not in _NOT_SCENE_FIELDS}
    text = json.dumps({"format": FORMAT, "scenes": scene_fields, "split": split,
                       "n": n_scenes, "sbl": asdict(settings or SblSettings())}, sort_keys=True)
    return f"{split}-{n_scenes}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def cached_front_end(measurements: torch.Tensor, deployment: Deployment,
                     config: ExperimentConfig, split: str, *,
                     settings: SblSettings | None = None) -> torch.Tensor:
    """The packed front end (B, D) of these measurements, the first B scenes of `split`: read
    from the cache, or computed once (under a file lock, so concurrent workers of a study wait
    for the first one instead of computing it again) and written there atomically."""
    key = cache_key(config, split, measurements.shape[0], settings)
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}.pt"
    with open(folder / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            try:
                packed = torch.load(path, weights_only=True)
                if packed.shape == (measurements.shape[0], FrontEnd.width(config.max_sources)):
                    return packed.to(measurements.device)
            except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError):
                _logger.warning("unreadable front-end cache %s: computing it again", path)
        packed = _compute_packed(measurements, deployment, config, settings)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        torch.save(packed.cpu(), tmp)
        tmp.replace(path)
    return packed.to(measurements.device)


def with_front_end(batch: SceneBatch, deployment: Deployment, config: ExperimentConfig,
                   split: str) -> SceneBatch:
    """`batch` (the first batch.size scenes of `split`) with its cached front end attached, and
    whether the front end's answer with the true K localizes every source (`located`)."""
    packed = cached_front_end(batch.measurements, deployment, config, split)
    front = FrontEnd.unpack(packed, config.max_sources)
    points, power, active = front.stage(batch.n_sources.to(packed.device))
    found = localization_from_points([points], [active], [power], config.max_sources,
                                     packed.device)
    located = torch.as_tensor(scene_success(found, batch.n_sources, batch),
                              dtype=torch.float32, device=packed.device)
    return replace(batch, frontend=packed, located=located)
