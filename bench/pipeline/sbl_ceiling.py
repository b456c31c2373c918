"""Where coded SBL still loses scenes given the true K: in its search, or in the likelihood itself.

On validation scenes (the val stream, as `sbl_tune`), each scene with its true K:

- `sbl`: coded SBL's answer with the true K (what `sparse_bayesian_learning(n_sources=K)` gives);
- `sbl + grid sweeps`: that answer, then two Gauss-Seidel sweeps in which each source may jump
  to the point of highest likelihood gain on SBL's whole grid (not only the points SBL kept), the
  others fixed (each jump raises the likelihood), each sweep followed by SBL's likelihood
  refinement of the scenes that moved: a RELAX-like search (`pipeline._sbl._grid_sweep`; SBL
  itself takes one such sweep since session 13, so `sbl` here runs with `grid_sweeps=0`);
- `from the truth`: SBL's likelihood refinement started at the true positions, each with an
  equal share of SBL's total power: the local optimum of the likelihood next to the truth
  (QUALITY.md's fit-from-truth proxy, here with SBL's likelihood instead of least squares).

For every scene where SBL fails and the fit from the truth succeeds, the two answers'
likelihoods are compared (negative log-likelihood of the measurements, each source's power shared
across snapshots): where the truth's optimum is likelier by more than 0.5 nats, a better search
over the same likelihood could win the scene; where it is less likely by more than that, no
maximum-likelihood estimator can, whatever its search; in between is a tie. SBL's own count on
the same scenes is also run, for the gap the count leaves, and SBL's failures with the true K are
split by what failed: an angle, or only the range. Success as `hpo evaluate` scores it, per SNR
bin.

    python -m bench sbl_ceiling [--preset medium] [--scenes 1000] [--threads 2]
"""

from __future__ import annotations

import time

import numpy as np
import torch

from bench import _harness as harness
from pipeline import (
    Localization,
    SblSettings,
    load_split,
    sparse_bayesian_learning,
)
from pipeline._grid import music_grid
from pipeline._metrics import (
    SUCCESS_AZIMUTH_DEG,
    SUCCESS_ELEVATION_DEG,
    in_success_box,
    localization_from_points,
    matched_errors,
    scene_success,
)
from pipeline._pursuit import _coded_atoms, coded_dictionary
from pipeline._sbl import (
    _candidates,
    _grid_sweep,
    _model_covariance,
    _refine,
    _sbl_powers,
    sbl_grid_config,
)

SNR_BINS = ((-5.0, 0.0), (0.0, 5.0), (5.0, 10.0), (10.0, 15.0), (15.0, 20.01))
_MARGIN_NATS = 0.5  # a likelihood difference below this counts as a tie


def _nll(points, power, active, noise, y, deployment) -> torch.Tensor:
    """sum_l (log det Sigma_l + y_l^H Sigma_l^-1 y_l) per scene (b,)."""
    atoms = _coded_atoms(points, deployment).permute(0, 2, 3, 1)
    factor = torch.linalg.cholesky(_model_covariance(atoms, power * active, noise))
    log_det = 2.0 * torch.log(torch.diagonal(factor, dim1=-2, dim2=-1).real).sum(-1)
    white = torch.linalg.solve_triangular(factor, y[..., None], upper=False).squeeze(-1)
    return (log_det + white.abs().square().sum(-1)).sum(-1)


def main(argv: list[str]) -> None:
    parser = harness.parser(__name__, __doc__)
    parser.add_argument("--preset", default="medium")
    parser.add_argument("--scenes", type=int, default=1000, help="validation scenes")
    parser.add_argument("--chunk", type=int, default=16, help="scenes per batch")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    config, deployment = harness.cpu_system(args)
    # SBL as it was before its own whole-grid sweep (session 13): the sweeps are a row here.
    settings = SblSettings(grid_sweeps=0)
    scenes = load_split(config, deployment, "val", args.scenes, chunk=250)
    grid_config = sbl_grid_config(config, settings)
    grid = music_grid(grid_config, deployment)
    atoms_conj, _ = coded_dictionary(grid_config, deployment)
    dictionary = atoms_conj.conj().resolve_conj()
    k_max = config.max_sources
    names = ("sbl", "sbl + grid sweeps", "from the truth")
    won: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    margins: list[torch.Tensor] = []  # NLL(SBL) - NLL(fit from the truth), nats
    sbl_found = []
    sweep_seconds = 0.0
    started = time.perf_counter()
    with torch.no_grad():
        for start in range(0, scenes.size, args.chunk):
            part = scenes.select(torch.arange(start, min(start + args.chunk, scenes.size)))
            y = part.measurements.to(torch.complex64)
            k = part.n_sources
            powers = _sbl_powers(y, atoms_conj, grid, k_max, settings)
            sbl = _candidates(y, k, deployment, grid, atoms_conj, k_max, settings, powers=powers)
            active = sbl.active
            clock = time.perf_counter()
            points, power, noise = sbl.points, sbl.power, sbl.noise
            for _ in range(2):
                points, power, noise = _grid_sweep(points, power, active, noise, y,
                                                   deployment, grid, dictionary, atoms_conj,
                                                   settings.refine_rounds)
            sweep_seconds += time.perf_counter() - clock
            truth = torch.stack([part.azimuth_rad, part.elevation_rad,
                                 1.0 / part.range_m.clamp_min(1e-3)], -1)
            truth = torch.where(active[..., None], truth, sbl.points)
            share = sbl.power.sum(-1, keepdim=True) / active.sum(-1, keepdim=True).clamp_min(1)
            fit, fit_power, fit_noise = _refine(truth, share * active, active, sbl.noise, y,
                                                deployment, grid, 2 * settings.refine_rounds)
            answers = {"sbl": sbl.points, "sbl + grid sweeps": points, "from the truth": fit}
            for name, found in answers.items():
                where = localization_from_points([found], [active], [sbl.power], k_max, "cpu")
                won[name].append(torch.as_tensor(scene_success(where, k, part)))
                if name == "sbl":
                    sbl_found.append(where)
            margins.append(_nll(sbl.points, sbl.power, active, sbl.noise, y, deployment)
                           - _nll(fit, fit_power, active, fit_noise, y, deployment))
            harness.note(f"{start + part.size}/{scenes.size} scenes, "
                         f"{time.perf_counter() - started:.0f} s")
    own = sparse_bayesian_learning(scenes.measurements, deployment, config, settings=settings)
    own_won = torch.as_tensor(scene_success(own, own.n_sources, scenes))
    result = {"preset": args.preset, "split": "val", "n_scenes": scenes.size,
              "grid sweeps: s per scene": sweep_seconds / scenes.size}
    columns = {name: torch.cat(won[name]).bool() for name in names}
    columns["sbl, own K"] = own_won.bool()
    margin = torch.cat(margins)
    lost = ~columns["sbl"] & columns["from the truth"]
    columns["search loss (truth likelier)"] = lost & (margin > _MARGIN_NATS)
    columns["tie (within 0.5 nats)"] = lost & (margin.abs() <= _MARGIN_NATS)
    columns["likelihood loss (truth less likely)"] = lost & (margin < -_MARGIN_NATS)
    # SBL's failures with the true K, by what failed: an angle, or only the range.
    sbl_all = Localization.cat(sbl_found)
    errors = matched_errors(sbl_all, scenes)
    outside = ~in_success_box(errors)
    angle = (errors["azimuth_deg"] > SUCCESS_AZIMUTH_DEG) | (
        errors["elevation_deg"] > SUCCESS_ELEVATION_DEG)
    by_angle = torch.as_tensor(
        np.bincount(errors["scene"][outside & angle], minlength=scenes.size) > 0)
    by_range = torch.as_tensor(
        np.bincount(errors["scene"][outside & ~angle], minlength=scenes.size) > 0)
    columns["sbl fails by an angle"] = ~columns["sbl"] & by_angle
    columns["sbl fails by the range only"] = ~columns["sbl"] & by_range & ~by_angle
    columns["sbl fails otherwise (a source unmatched)"] = ~columns["sbl"] & ~by_angle & ~by_range
    # The range errors of the pairs that fail by the range only: bias or spread?
    range_only = outside & ~angle
    signed = (sbl_all.range_m.numpy()[errors["scene"], errors["est_slot"]]
              - errors["true_range_m"])[range_only]
    if signed.size:
        result["range-only pairs"] = {
            "n": int(signed.size),
            "estimate - truth, m, quantiles 10/25/50/75/90": np.quantile(
                signed, [0.1, 0.25, 0.5, 0.75, 0.9]).round(3).tolist(),
            "true range, m, quantiles 10/50/90": np.quantile(
                errors["true_range_m"][range_only], [0.1, 0.5, 0.9]).round(2).tolist()}
        harness.note(f"range-only pairs: {result['range-only pairs']}")
    snr = scenes.snr_db
    header = "| row | " + " | ".join(f"{lo:g}..{min(hi, 20):g}" for lo, hi in SNR_BINS)
    harness.note(header + " | all |")
    for name, column in columns.items():
        shares = [float(column[(snr >= lo) & (snr < hi)].float().mean()) for lo, hi in SNR_BINS]
        overall = float(column.float().mean())
        result[name] = {"by SNR bin": shares, "all": overall}
        harness.note(f"| {name} | " + " | ".join(f"{v:.3f}" for v in shares)
                     + f" | {overall:.3f} |")
    harness.emit(result)
