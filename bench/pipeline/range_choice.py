"""What choosing each range for the success box buys (`pipeline._range_decision`), and its cost.

On training or validation scenes, SBL's refined answer with its own count and with the true K,
each scored twice: as it is (the likelihood's peak in range) and with every
range chosen for the success box (`ranges_for_success`, what the learned row does since session
14). Per SNR bin: success; overall: the scenes won and lost, and the inlier range RMSE at >= 10 dB
(the Cramer-Rao rows' figure: the decision keeps the peak where the posterior is narrow, so it
should not grow). `--variants` also scores the choices that were weighed, from the same range
profiles: a temperature on the likelihood (posterior exp(gain / T)), the prior (u^-a: 0 is
uniform in 1/r, the default; a = 2 is range uniform in metres, the scenes' own) and the tie
margin. The decision's
cost per scene is timed on the default choice (one thread unless --threads).

`--split test` scores the default alone on `hpo evaluate`'s test scenes (its seed 0): what SBL's
own row would score with the rule, beside the learned row's table. The variants were chosen on
training and validation scenes, so `--variants` is refused there.

    python -m bench range_choice [--split val] [--scenes 1000] [--threads 2] [--variants]
"""

from __future__ import annotations

import time

import numpy as np
import torch

from bench import _harness as harness
from pipeline import Localization, SblSettings, load_split
from pipeline._benchmark_eval import evaluation_scenes
from pipeline._data import SceneBatch
from pipeline._grid import music_grid
from pipeline._metrics import (
    in_success_box,
    localization_from_points,
    matched_errors,
    scene_success,
)
from pipeline._pursuit import coded_dictionary
from pipeline._range_decision import (
    _MASS_TIE,
    apply_choice,
    range_line,
    range_profiles,
    ranges_for_success,
)
from pipeline._sbl import _candidates, _localize_chunk, _sbl_powers, sbl_grid_config

SNR_BINS = ((-5.0, 0.0), (0.0, 5.0), (5.0, 10.0), (10.0, 15.0), (15.0, 20.01))
# (temperature, prior exponent, tie margin): the default first
VARIANTS = ((1.0, 0.0, _MASS_TIE), (1.0, 2.0, _MASS_TIE), (0.5, 0.0, _MASS_TIE),
            (2.0, 0.0, _MASS_TIE), (1.0, 0.0, 0.0), (1.0, 0.0, 1e-2))


def main(argv: list[str]) -> None:
    parser = harness.parser(__name__, __doc__)
    parser.add_argument("--preset", default="medium")
    parser.add_argument("--split", choices=("train", "val", "test"), default="val")
    parser.add_argument("--scenes", type=int, default=1000)
    parser.add_argument("--chunk", type=int, default=32, help="scenes per batch")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", action="store_true",
                        help="also score the temperatures, priors and tie margins weighed")
    args = parser.parse_args(argv)
    if args.split == "test" and args.variants:
        parser.error("--variants is for training and validation scenes, where they were chosen")
    config, deployment = harness.cpu_system(args)
    settings = SblSettings()
    if args.split == "test":  # hpo evaluate's scenes, seed 0, in its chunks: SBL's answers
        batches = evaluation_scenes(config, deployment, args.scenes, 0)  # are then its SBL row's
    else:
        batches = [load_split(config, deployment, args.split, args.scenes, chunk=250)]
    scenes = SceneBatch.concat(batches)
    parts = [batch.select(torch.arange(start, min(start + args.chunk, batch.size)))
             for batch in batches for start in range(0, batch.size, args.chunk)]
    grid_config = sbl_grid_config(config, settings)
    grid = music_grid(grid_config, deployment)
    atoms_conj, _ = coded_dictionary(grid_config, deployment)
    k_max = config.max_sources
    line = range_line(config)
    rows: dict[str, dict[str, list]] = {"own count": {}, "true K": {}}
    seconds = 0.0
    started = time.perf_counter()
    with torch.no_grad():
        done = 0
        for part in parts:
            y = part.measurements.to(torch.complex64)
            powers = _sbl_powers(y, atoms_conj, grid, k_max, settings)
            states = {"own count": _localize_chunk(y, None, deployment, grid, atoms_conj, k_max,
                                                   settings),
                      "true K": _candidates(y, part.n_sources, deployment, grid, atoms_conj,
                                            k_max, settings, powers=powers)}
            for name, state in states.items():
                clock = time.perf_counter()
                chosen, chosen_power = ranges_for_success(state.points, state.power,
                                                          state.active, state.noise, y,
                                                          deployment, config)
                if name == "own count":
                    seconds += time.perf_counter() - clock
                answers = {"peak": (state.points, state.power),
                           "chosen": (chosen, chosen_power)}
                if args.variants:  # the module's decision with other posteriors and ties
                    profiles = range_profiles(state.points, state.power, state.active,
                                              state.noise, y, deployment, line)
                    for temperature, exponent, tie in VARIANTS:
                        key = f"T {temperature:g}, prior u^-{exponent:g}, tie {tie:g}"
                        log_posterior = (profiles.gain.double() / temperature
                                         - exponent * torch.log(line.double()))
                        answers[key] = apply_choice(state.points, state.power, profiles, line,
                                                    log_posterior, tie=tie)
                for key, (found, power) in answers.items():
                    where = localization_from_points([found], [state.active], [power], k_max,
                                                     "cpu")
                    rows[name].setdefault(key, []).append((where, state.active.sum(-1)))
            done += part.size
            harness.note(f"{done}/{scenes.size} scenes, "
                         f"{time.perf_counter() - started:.0f} s")
    snr = scenes.snr_db
    result = {"preset": args.preset, "split": args.split, "n_scenes": scenes.size,
              "decision: ms per scene (own count)": 1e3 * seconds / scenes.size}
    harness.note(f"decision: {result['decision: ms per scene (own count)']:.1f} ms per scene")
    for name, answers in rows.items():
        base = None
        for key, pieces in answers.items():
            found = Localization.cat([piece[0] for piece in pieces])
            k_hat = torch.cat([piece[1] for piece in pieces])
            won = torch.as_tensor(scene_success(found, k_hat, scenes))
            errors = matched_errors(found, scenes)
            high = snr.numpy()[errors["scene"]] >= 10.0
            inlier = in_success_box(errors) & high
            rmse = float(np.sqrt(np.mean(errors["range_m"][inlier] ** 2)))
            base = won if base is None else base
            shares = [float(won[(snr >= lo) & (snr < hi)].float().mean()) for lo, hi in SNR_BINS]
            entry = {"by SNR bin": shares, "all": float(won.float().mean()),
                     "won": int((won & ~base).sum()), "lost": int((base & ~won).sum()),
                     "inlier range RMSE >= 10 dB, m": rmse}
            result[f"{name}: {key}"] = entry
            harness.note(f"| {name}: {key} | " + " | ".join(f"{v:.3f}" for v in shares)
                         + f" | {entry['all']:.3f} | +{entry['won']} -{entry['lost']} | "
                         f"{rmse:.3f} |")
    harness.emit(result)
