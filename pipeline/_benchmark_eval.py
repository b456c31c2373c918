"""A trained model against the references (SYSTEM.md §5), per SNR bin and per K, on test scenes.

Six rows on the same scenes:

  learned   MUSIC on the learned R_blend with the K head's count
  samp      classical: MUSIC on R_samp with MDL's count (MDL is the classical reference for K)
  pursuit   classical: orthogonal matching pursuit on the measurements (`pipeline._pursuit`),
            with MDL's count
  sbl       classical: coded sparse Bayesian learning with likelihood refinement
            (`pipeline._sbl`), with its own count (a threshold on each source's likelihood gain);
            for the SBL count network, read off the learned row's own SBL front end
            (`sbl_from_front_end`, the same arithmetic and answer), so SBL runs once per scene
            and its seconds count only its count and refinement
  oracle    MUSIC on R_true with the true count
  crb       the Cramer-Rao bound of the measurement model (`pipeline._crb`, "joint": every
            position, power and the noise variance unknown), at the true sources

Scenes come from the test stream of the checkpoint's data seed (`split_seeds(config.seed)["test"]`,
disjoint by construction from the train and validation streams), chunk c of evaluation seed S
drawn from the child seed (test stream, S, c): seed 0 gives the test split itself (as
`load_split(config, deployment, "test", n, chunk=SCENE_CHUNK)` draws it, for whole chunks).
Chunks are always drawn whole, so the scenes of a smaller evaluation are the first ones of a
larger one.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline._config import ExperimentConfig, config_to_dict
from pipeline._counting import mdl_estimate
from pipeline._crb import cramer_rao_bound
from pipeline._data import SceneBatch, _batch_seed, generate_scenes, split_seeds
from pipeline._frontend import front_end, sbl_from_front_end
from pipeline._losses import covariances
from pipeline._metrics import (
    Localization,
    in_success_box,
    localization_metrics,
    matched_errors,
    scene_success,
)
from pipeline._model import music_seeds, predicted_count
from pipeline._music import music_localize
from pipeline._physics import Deployment
from pipeline._pursuit import matching_pursuit
from pipeline._sbl import sparse_bayesian_learning
from pipeline._sbl_net import SblCountNet

SNR_BIN_EDGES_DB = (-5.0, 0.0, 5.0, 10.0, 15.0, 20.0)
SCENE_CHUNK = 250  # scenes drawn (and localized) together; part of the scene definition
METHODS: dict[str, str] = {
    "learned": "learned R_blend (K head)",
    "samp": "MUSIC on R_samp (MDL)",
    "pursuit": "matching pursuit (MDL)",
    "sbl": "coded SBL (its own K)",
    "oracle": "MUSIC on R_true (true K)",
    "crb": "Cramer-Rao bound",
}
LOCALIZERS = ("learned", "samp", "pursuit", "sbl", "oracle")
_PARAMS = ("azimuth_deg", "elevation_deg", "range_m")


@dataclass(frozen=True)
class EvaluationResult:
    """rows: one dict per (method, group, bin); see `evaluate_model` for the keys.

    scenes: one dict per scene (`scene_records`); paired: the learned row against each classical
    row on the same scenes (`paired_tests`).
    """

    rows: list[dict[str, Any]]
    n_scenes: int
    seed: int
    seconds: dict[str, float]  # wall time per stage (scenes, model, each method, crb, metrics)
    config: dict[str, Any]
    scenes: list[dict[str, Any]] = field(default_factory=list)
    paired: list[dict[str, Any]] = field(default_factory=list)


def evaluation_scenes(config: ExperimentConfig, deployment: Deployment, n_scenes: int, seed: int
                ) -> list[SceneBatch]:
    """The evaluation scenes, in chunks of SCENE_CHUNK; a pure function of (config, seed)."""
    if n_scenes < 1:
        raise ValueError(f"n_scenes must be >= 1, but got {n_scenes=}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, but got {seed=}")
    root = split_seeds(config.seed)["test"]
    chunks = []
    for index in range(math.ceil(n_scenes / SCENE_CHUNK)):
        batch = generate_scenes(config, deployment, SCENE_CHUNK, _batch_seed(root, seed, index))
        keep = min(SCENE_CHUNK, n_scenes - index * SCENE_CHUNK)
        chunks.append(batch if keep == SCENE_CHUNK else batch.select(slice(0, keep)))
    return chunks


def _dense(matrix: Any) -> torch.Tensor:
    """(B, N, N) complex64 from a dense tensor or a factor-form covariance."""
    return matrix.dense() if hasattr(matrix, "dense") else matrix.to(torch.complex64)


def _with_loading(matrix: torch.Tensor, loading: float) -> torch.Tensor:
    """R + loading I; the inference-only diagonal loading of SYSTEM.md §3 (as in evaluation)."""
    if not loading:
        return matrix
    return matrix + loading * torch.eye(matrix.shape[-1], dtype=matrix.dtype,
                                        device=matrix.device)


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, config: ExperimentConfig, deployment: Deployment, *,
                   n_scenes: int = 2000, seed: int = 0,
                   progress: Callable[[int, int], None] | None = None) -> EvaluationResult:
    """Localize n_scenes fresh test scenes with the six rows of the module docstring.

    model: a trained CovarianceNet in eval mode on the deployment's device (`load_model`).
    progress(done, total) is called after every chunk of scenes.
    Each row dict holds: method, label, group ("all", "snr" or "k"), bin (e.g. "all", "-5..0",
    "3"), n_scenes, n_sources and, for the four localizers, the keys of `localization_metrics`
    plus k_over / k_under (share of scenes with K_hat above / below K), rmse_range_relative,
    and rmse_over_crb_* / inlier_rmse_over_crb_* (RMSE over sqrt(mean CRB) of the same pairs);
    for the crb row, rmse_* = sqrt(mean CRB) and median_* = median sqrt(CRB) over the true
    sources, rmse_range_relative = sqrt(mean CRB_r / r^2). Keys that do not apply are None.
    """
    model.eval()
    seconds = dict.fromkeys(("scenes", "model", *LOCALIZERS, "crb", "metrics"), 0.0)
    started = time.perf_counter()
    chunks = evaluation_scenes(config, deployment, n_scenes, seed)
    seconds["scenes"] = time.perf_counter() - started
    found: dict[str, list[Localization]] = {name: [] for name in LOCALIZERS}
    counts: dict[str, list[torch.Tensor]] = {name: [] for name in LOCALIZERS}
    bounds = []
    done = 0
    for batch in chunks:
        tick = time.perf_counter()
        shared_sbl = None
        if isinstance(model, SblCountNet):  # one SBL front end for its row and SBL's row
            front, powers = front_end(batch.measurements, deployment, config, keep_powers=True)
            output = model.answer(batch.measurements, front, powers)
            shared_sbl = (front, powers)
        else:
            output = model(batch.measurements, batch.fields)
        mats = covariances(output, batch, config)
        r_blend = _with_loading(_dense(mats.blend), config.diag_loading)
        r_samp, r_true = _dense(mats.samp), _dense(mats.true)
        k_head = predicted_count(output).clamp(1, config.max_sources)
        k_mdl = mdl_estimate(r_samp, config.n_snapshots, max_sources=config.max_sources)
        seconds["model"] += time.perf_counter() - tick
        seeds = music_seeds(model, output)
        inputs = {"learned": (r_blend, k_head), "samp": (r_samp, k_mdl),
                  "pursuit": (batch.measurements, k_mdl), "sbl": (batch.measurements, None),
                  "oracle": (r_true, batch.n_sources)}
        for name, (data, k_hat) in inputs.items():
            tick = time.perf_counter()
            if name == "pursuit":
                found[name].append(matching_pursuit(data, k_hat, deployment, config))
            elif name == "sbl" and shared_sbl is not None:
                found[name].append(sbl_from_front_end(data, *shared_sbl, deployment, config))
                k_hat = found[name][-1].n_sources
            elif name == "sbl":
                found[name].append(sparse_bayesian_learning(data, deployment, config))
                k_hat = found[name][-1].n_sources  # its own count
            else:
                found[name].append(music_localize(data, k_hat, deployment, config,
                                                  seeds=seeds if name == "learned" else None))
            counts[name].append(k_hat.clamp(1, config.max_sources))
            seconds[name] += time.perf_counter() - tick
        tick = time.perf_counter()
        bounds.append(cramer_rao_bound(batch, config))
        seconds["crb"] += time.perf_counter() - tick
        done += batch.size
        if progress is not None:
            progress(done, n_scenes)

    tick = time.perf_counter()
    truth = SceneBatch.concat(chunks)
    crb = torch.cat(bounds).cpu().numpy()  # (B, K_max, 3) rad^2, rad^2, m^2
    crb[..., :2] *= (180.0 / math.pi) ** 2  # degrees^2
    localizations = {name: Localization.cat(parts) for name, parts in found.items()}
    k_hats = {name: torch.cat(parts) for name, parts in counts.items()}
    rows = []
    for group, label, index in _groups(truth):
        for name in LOCALIZERS:
            rows.append({"method": name, "label": METHODS[name], "group": group, "bin": label,
                         **_localizer_row(localizations[name], k_hats[name], truth, crb, index,
                                          config)})
        rows.append({"method": "crb", "label": METHODS["crb"], "group": group, "bin": label,
                     **_bound_row(truth, crb, index)})
    successes = {name: scene_success(localizations[name], k_hats[name], truth)
                 for name in LOCALIZERS}
    paired = paired_tests(successes)
    records = scene_records(truth, localizations, k_hats)
    seconds["metrics"] = time.perf_counter() - tick
    return EvaluationResult(rows=rows, n_scenes=n_scenes, seed=seed, seconds=seconds,
                            config=config_to_dict(config), scenes=records, paired=paired)


def mcnemar_exact(only_first: int, only_second: int) -> float:
    """Two-sided exact McNemar p-value: binomial(n, 1/2) on the n discordant pairs. Exact integer
    arithmetic, then one division: 2.0 ** n overflows a float from n = 1024 on (a 2,000-scene
    evaluation where one method wins most scenes has that many)."""
    n = only_first + only_second
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_first, only_second) + 1)) / 2**n
    return min(1.0, 2.0 * tail)


def paired_tests(successes: dict[str, np.ndarray], learned: str = "learned",
                 classical: tuple[str, ...] = ("samp", "pursuit", "sbl")) -> list[dict[str, Any]]:
    """The learned row against each classical row on the same scenes: exact McNemar.

    successes: per-scene success (B,) bool per method. One dict per classical row: method,
    versus, n_scenes, success (learned's), versus_success, learned_only and versus_only (the
    discordant scenes), p_value (two-sided).
    """
    first = successes[learned]
    tests = []
    for name in classical:
        if name not in successes:
            continue
        second = successes[name]
        learned_only = int((first & ~second).sum())
        versus_only = int((~first & second).sum())
        tests.append({"method": learned, "versus": name, "n_scenes": int(first.size),
                      "success": float(first.mean()), "versus_success": float(second.mean()),
                      "learned_only": learned_only, "versus_only": versus_only,
                      "p_value": mcnemar_exact(learned_only, versus_only)})
    return tests


def _triples(azimuth: torch.Tensor, elevation: torch.Tensor, range_m: torch.Tensor,
             mask: torch.Tensor) -> list[list[list[float]]]:
    rows = torch.stack([azimuth, elevation, range_m], dim=-1).cpu().tolist()
    keep = mask.cpu().tolist()
    return [[point for point, valid in zip(scene, flags) if valid]
            for scene, flags in zip(rows, keep)]


def scene_records(truth: SceneBatch, localizations: dict[str, Localization],
                  k_hats: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """One JSON-ready dict per scene: enough to rescore every row without this project's code.

    Keys: scene (index), snr_db, n_sources, truth (K [azimuth rad, elevation rad, range m]),
    and per method {"n_sources": K_hat, "estimates": [[azimuth rad, elevation rad, range m],
    ...]}. Success: K_hat = K and, after matching estimates to true sources by the assignment
    that minimises the summed Euclidean distance in units of (5 deg, 5 deg, 1 m), every true
    source within 3 deg / 3 deg / 0.5 m. Values are the float32 results written exactly.
    """
    true_sets = _triples(truth.azimuth_rad, truth.elevation_rad, truth.range_m,
                         truth.source_mask)
    found = {name: _triples(loc.azimuth_rad, loc.elevation_rad, loc.range_m, loc.mask)
             for name, loc in localizations.items()}
    counts = {name: k.cpu().tolist() for name, k in k_hats.items()}
    snr = truth.snr_db.cpu().tolist()
    n_sources = truth.n_sources.cpu().tolist()
    return [{"scene": index, "snr_db": snr[index], "n_sources": n_sources[index],
             "truth": true_sets[index],
             "methods": {name: {"n_sources": counts[name][index],
                                "estimates": found[name][index]} for name in found}}
            for index in range(truth.size)]


def _groups(truth: SceneBatch) -> list[tuple[str, str, torch.Tensor]]:
    """(group, bin label, scene indices): all scenes, each SNR bin, each K (empty bins left out)."""
    snr = truth.snr_db.cpu()
    k = truth.n_sources.cpu()
    groups = [("all", "all", torch.arange(truth.size))]
    edges = SNR_BIN_EDGES_DB
    for position, (low, high) in enumerate(itertools.pairwise(edges)):
        last = position == len(edges) - 2
        inside = (snr >= low) & ((snr <= high) if last else (snr < high))
        groups.append(("snr", f"{low:g}..{high:g}", inside.nonzero().squeeze(-1)))
    for n_sources in sorted(k.unique().tolist()):
        groups.append(("k", str(n_sources), (k == n_sources).nonzero().squeeze(-1)))
    return [g for g in groups if g[2].numel() > 0]


def _rms(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(np.sqrt(np.mean(np.square(finite)))) if finite.size else None


def _ratio(errors: np.ndarray, bounds: np.ndarray) -> float | None:
    """RMSE of `errors` over sqrt(mean of their pairs' CRBs); None without finite pairs."""
    ok = np.isfinite(bounds)
    if not ok.any():
        return None
    return float(np.sqrt(np.mean(np.square(errors[ok])) / np.mean(bounds[ok])))


def _localizer_row(localization: Localization, k_hat: torch.Tensor, truth: SceneBatch,
                   crb: np.ndarray, index: torch.Tensor, config: ExperimentConfig
                   ) -> dict[str, Any]:
    device = localization.mask.device
    part = localization.select(index.to(device))
    true_part = truth.select(index.to(truth.n_sources.device))
    k_part = k_hat[index.to(k_hat.device)]
    row: dict[str, Any] = localization_metrics(part, true_part, k_part, config=config)
    row["n_scenes"] = int(index.numel())
    row["n_pairs"] = int(row["n_pairs"])
    row["n_sources"] = int(true_part.n_sources.sum())
    k_true = true_part.n_sources.cpu().numpy()
    k_est = k_part.cpu().numpy()
    row["k_over"] = float(np.mean(k_est > k_true))
    row["k_under"] = float(np.mean(k_est < k_true))
    errors = matched_errors(part, true_part)
    row["rmse_range_relative"] = _rms(errors["range_m"] / errors["true_range_m"])
    pair_crb = crb[index.numpy()][errors["scene"], errors["true_slot"]]  # (n_pairs, 3)
    inside = in_success_box(errors)
    for axis, name in enumerate(_PARAMS):
        row[f"rmse_over_crb_{name}"] = _ratio(errors[name], pair_crb[:, axis])
        row[f"inlier_rmse_over_crb_{name}"] = _ratio(errors[name][inside],
                                                     pair_crb[inside, axis])
    return row


def _bound_row(truth: SceneBatch, crb: np.ndarray, index: torch.Tensor) -> dict[str, Any]:
    part = truth.select(index.to(truth.n_sources.device))
    mask = part.source_mask.cpu().numpy()
    bound = crb[index.numpy()][mask]  # (n_sources, 3)
    true_range = part.range_m.cpu().numpy()[mask].astype(np.float64)
    finite = np.isfinite(bound).all(-1)
    row: dict[str, Any] = {"n_scenes": int(index.numel()), "n_sources": int(mask.sum()),
                           "n_unbounded": int((~finite).sum())}
    for axis, name in enumerate(_PARAMS):
        values = bound[finite, axis]
        row[f"rmse_{name}"] = float(np.sqrt(values.mean())) if values.size else None
        row[f"median_{name}"] = float(np.median(np.sqrt(values))) if values.size else None
    relative = bound[finite, 2] / np.square(true_range[finite])
    row["rmse_range_relative"] = float(np.sqrt(relative.mean())) if relative.size else None
    return row
