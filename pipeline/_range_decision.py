"""Each source's range chosen for the success box, not for the likelihood's peak (issue 16).

A scene succeeds when every source lands within 3 deg / 3 deg / 0.5 m of the truth. In range the
likelihood is often broad and lopsided: range enters the phase through 1/r (`pipeline._grid`),
so a peak of even width in 1/r spans far more metres on its far side than on its near side, and
at 2-4 m it can span more than the box's metre. The estimate that maximises the chance of
landing within +-0.5 m is then not the peak.

For each active source, the others fixed at their estimates, the likelihood gain of SBL's
refinement (`pipeline._sbl._gains`, its power maximised) is evaluated along inverse range at the
source's own angles. Taken as it is, with a prior flat in u = 1/r, it gives a posterior over
range on that line,

    P(u | y) ~ exp(gain(u)),

and the range chosen is the one whose +-0.5 m window holds the most of it (each line point's
weight spread over its cell, so windows of any centre compare without rounding). The peak is
kept unless another range holds more than `_MASS_TIE` more: where the posterior is narrower than
the window every nearby range holds all of it, and the peak (the maximum-likelihood estimate,
whose error is what the Cramer-Rao rows measure) is the natural member of that plateau. A source
that moves takes the power that maximises the likelihood at its new range, and never moves to a
range where that power is 0; angles do not move.

Chosen on training and validation scenes (RESULTS.md, "Session 14"; `python -m bench
range_choice --variants`): the likelihood as it is (no temperature), the tie margin 1e-3, and
the prior flat in 1/r rather than the scenes' own (range uniform in metres, density 1/u^2 in u).
The scenes' prior won as many scenes and lost more: 17 scenes against 4 over the 3,000 scenes
of both splits, with SBL's count and with the true K; the profile likelihood, the others held
fixed, is not the whole posterior, and the 1/u^2 factor leans on its flat far end.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from pipeline._config import ExperimentConfig
from pipeline._metrics import SUCCESS_RANGE_M
from pipeline._physics import Deployment
from pipeline._pursuit import _coded_atoms
from pipeline._sbl import _gains, _leave_one_out

_MASS_TIE = 1e-3  # a range must hold this much more posterior mass than the peak to replace it
N_RANGE_POINTS = 200  # points of the inverse-range line, uniform in 1/r over the field of view


def range_line(config: ExperimentConfig, n_points: int = N_RANGE_POINTS,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """(n_points,) float32 inverse ranges 1/m, uniform from 1/range_max_m to 1/range_min_m."""
    if n_points < 2:
        raise ValueError(f"the range line needs at least 2 points, but got {n_points=}")
    return torch.linspace(1.0 / config.range_max_m, 1.0 / config.range_min_m, n_points,
                          device=device)


def _cumulative(weight: torch.Tensor, line: torch.Tensor, inverse: torch.Tensor
                ) -> torch.Tensor:
    """Posterior mass below inverse ranges `inverse` (S, m), each point's weight (S, n) spread
    evenly over its cell of the uniform line (n,) (edges halfway between points): continuous in
    `inverse`, so a window's mass does not jump as its edges cross points."""
    step = line[1] - line[0]
    below = torch.nn.functional.pad(weight.cumsum(-1), (1, 0))  # (S, n + 1): mass below edge i
    position = ((inverse - (line[0] - 0.5 * step)) / step).clamp(0.0, line.numel())
    cell = position.floor().long().clamp(max=line.numel() - 1)
    fraction = (position - cell).clamp(0.0, 1.0)
    return below.gather(-1, cell) + fraction * weight.gather(-1, cell)


def window_mass(weight: torch.Tensor, line: torch.Tensor, centre: torch.Tensor,
                half_width_m: float = SUCCESS_RANGE_M) -> torch.Tensor:
    """Posterior mass within +-half_width_m of ranges 1 / centre (S, m) (1/m), from the weights
    (S, n) on the inverse-range line (n,): (S, m)."""
    centre_m = 1.0 / centre
    near = 1.0 / (centre_m - half_width_m).clamp_min(1e-9)  # window edges in 1/r
    far = 1.0 / (centre_m + half_width_m)
    return _cumulative(weight, line, near) - _cumulative(weight, line, far)


def choose_in_window(log_posterior: torch.Tensor, line: torch.Tensor, peak: torch.Tensor,
                     half_width_m: float = SUCCESS_RANGE_M, tie: float = _MASS_TIE
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The range of most posterior mass within +-half_width_m, per source.

    log_posterior (S, n): unnormalised log posterior on the inverse-range line (n,) 1/m (uniform
    in 1/r, so equal weights per point). peak (S,): each source's current inverse range (its
    likelihood's peak). Each point's weight is spread over its cell (`_cumulative`), so the
    mass of a window centred between points (the peak's) and on a point compare without
    rounding. Returns (S,) bool, where a point of the line holds more than `tie` more mass than
    the peak's window, and (S,) long, the index on the line of the range to take there: among
    the points within `tie` of the most mass, the most probable.
    """
    log_posterior = log_posterior.double()
    line = line.double()
    weight = torch.softmax(log_posterior, dim=-1)
    mass = window_mass(weight, line, line.expand_as(weight), half_width_m)  # (S, n)
    at_peak = window_mass(weight, line, peak.double()[:, None], half_width_m)[:, 0]
    best = mass.amax(-1)
    near_best = mass >= best[:, None] - tie
    pick = torch.where(near_best, log_posterior, -torch.inf).argmax(-1)
    return best > at_peak + tie, pick


class RangeProfiles(NamedTuple):
    """The likelihood along the range line of each active source: scene and slot (S,) index
    them; gain (S, n) nats and power (S, n) its maximising power at each point of the line."""

    scene: torch.Tensor
    slot: torch.Tensor
    gain: torch.Tensor
    power: torch.Tensor


def range_profiles(points: torch.Tensor, power: torch.Tensor, active: torch.Tensor,
                   noise: torch.Tensor, y: torch.Tensor, deployment: Deployment,
                   line: torch.Tensor) -> RangeProfiles:
    """Each active source's likelihood gain (SBL's refinement, power maximised) at its own
    angles and every inverse range of `line`, the other sources fixed (one leave-one-out model
    per source). Arguments as `ranges_for_success`."""
    scene, slot = active.nonzero(as_tuple=True)
    atoms = _coded_atoms(points, deployment).permute(0, 2, 3, 1)  # (b, L, M, K)
    inverse, weighted = _leave_one_out(atoms, power * active, noise, y)
    candidates = points[scene, slot][:, None, :].repeat(1, line.numel(), 1)
    candidates[..., 2] = line
    gain, gain_power = _gains(inverse[scene, slot], weighted[scene, slot],
                              _coded_atoms(candidates, deployment))
    return RangeProfiles(scene, slot, gain, gain_power)


def apply_choice(points: torch.Tensor, power: torch.Tensor, profiles: RangeProfiles,
                 line: torch.Tensor, log_posterior: torch.Tensor, tie: float = _MASS_TIE
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Points and power with the ranges `choose_in_window` picks from `log_posterior` (S, n),
    one row per source of `profiles`; a source never moves onto a range where it would explain
    nothing (its power 0 there), and one that moves takes its power there."""
    scene, slot = profiles.scene, profiles.slot
    move, pick = choose_in_window(log_posterior, line, points[scene, slot, 2], tie=tie)
    move &= profiles.power.gather(1, pick[:, None]).squeeze(1) > 0
    points, power = points.clone(), power.clone()
    points[scene[move], slot[move], 2] = line[pick[move]]
    power[scene[move], slot[move]] = profiles.power[move, pick[move]]
    return points, power


@torch.no_grad()
def ranges_for_success(points: torch.Tensor, power: torch.Tensor, active: torch.Tensor,
                       noise: torch.Tensor, y: torch.Tensor, deployment: Deployment,
                       config: ExperimentConfig, *, n_points: int = N_RANGE_POINTS
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """SBL's sources with each range chosen for the success box (module docstring).

    points (b, K, 3) (azimuth rad, elevation rad, 1/m), power (b, K), active (b, K) bool,
    noise (b,), y (b, L, M) complex64: a refined SBL state (`pipeline._sbl._State`) and its
    measurements. All sources are decided from the same state (the others at their estimates).
    Returns points and power; inactive slots, angles and sources that keep their peak come back
    unchanged.
    """
    if not bool(active.any()):
        return points, power
    line = range_line(config, n_points, points.device)
    profiles = range_profiles(points, power, active, noise, y, deployment, line)
    # the likelihood as it is: a prior flat in 1/r (module docstring)
    return apply_choice(points, power, profiles, line, profiles.gain)
