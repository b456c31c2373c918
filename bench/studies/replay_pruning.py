"""Replay a `--pruner none` study through learning-curve pruning rules, offline.

Takes a study kept by `python -m bench pruning --keep DIR` (every trial trained to the end) and
replays its complete trials in trial-number order, as if a pruner had decided at epoch `--rung`:

- rank: successive halving on the epoch's value (go on while in the best 1/eta so far);
- extrapolate: a ridge regression of the final value on the trial's parameters and its value at
  the rung, fitted on the trials complete so far; go on while the prediction is within the best
  q of the complete trials' finals.

The first `startup` trials always complete. It reports, for a grid of settings, the epochs the
rule would have trained, how many trials it would have completed and the best final among them.
The sampler's feedback is not replayed (a real pruned study samples other trials), so this only
tells whether a rule is worth a real run, and how much its outcome hangs on its settings.

    python -m bench replay_pruning DIR/none-seed0.db [--study pruning] [--rung 1]
"""

from __future__ import annotations

import math

import numpy as np
import optuna

from bench import _harness as harness

_LOG = {"lr", "weight_decay", "lam_k", "lam_aux", "lam_det", "batch_size"}


def _features(trial: optuna.trial.FrozenTrial, names: list[str]) -> list[float]:
    return [math.log(trial.params[n]) if n in _LOG else float(trial.params[n]) for n in names]


def _ridge(x: np.ndarray, y: np.ndarray, lam: float = 5.0):
    mean, scale = x.mean(0), x.std(0) + 1e-9
    a = (x - mean) / scale
    w = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ (y - y.mean()))
    return lambda row: float(((np.asarray(row) - mean) / scale) @ w + y.mean())


def replay(trials: list[optuna.trial.FrozenTrial], rule: str, startup: int, setting: float,
           rung: int) -> dict:
    epochs_each = max(len(t.intermediate_values) for t in trials)
    names = list(trials[0].params)
    complete: list[optuna.trial.FrozenTrial] = []
    seen: list[float] = []
    epochs = 0
    for t in trials:
        at_rung = t.intermediate_values[rung]
        if len(complete) < startup:
            go_on = True
        elif rule == "rank":  # setting: eta
            seen.append(at_rung)
            go_on = at_rung <= sorted(seen)[max(0, len(seen) // int(setting) - 1)]
        else:  # setting: q
            finals = np.array([c.value for c in complete])
            x = np.array([_features(c, names) + [c.intermediate_values[rung]] for c in complete])
            predicted = _ridge(x, finals)(_features(t, names) + [at_rung])
            go_on = predicted <= np.quantile(finals, setting)
        if go_on:
            complete.append(t)
        epochs += epochs_each if go_on else rung
    return {"rule": rule, "startup": startup, "setting": setting, "epochs": epochs,
            "ratio": round(epochs_each * len(trials) / epochs, 2), "complete": len(complete),
            "best": round(min(c.value for c in complete), 4)}  # fmt: skip


def main(argv: list[str]) -> None:
    parser = harness.parser(__name__, __doc__)
    parser.add_argument("db", help="SQLite file of a --pruner none study")
    parser.add_argument("--study", default="pruning")
    parser.add_argument("--rung", type=int, default=1, help="the epoch the rule decides at")
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    harness.header(args)
    study = optuna.load_study(study_name=args.study, storage=f"sqlite:///{args.db}")
    trials = sorted((t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"),
                    key=lambda t: t.number)  # fmt: skip
    harness.emit({"trials": len(trials),
                  "epochs": sum(len(t.intermediate_values) for t in trials),
                  "best": round(min(t.value for t in trials), 4)})
    for rule, settings in (("rank", (3, 4, 6)), ("extrapolate", (0.1, 0.2, 0.3))):
        for startup in (10, 20, 30):
            for setting in settings:
                harness.emit(replay(trials, rule, startup, setting, args.rung))
