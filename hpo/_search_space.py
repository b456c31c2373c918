"""The search space: Optuna trial -> ExperimentConfig. The only caller of `trial.suggest_*`.
Model sbl_count (the `quick`, `medium` and `full` presets) has its own default space: the count
network's width, depth and dropout, the optimiser, `beta` (0-0.1), `lam_k` and
`count_for_success` (`_sbl_count_params`).
For the detection-map network (model grid), the default space covers the optimiser (learning rate, weight decay, batch size, warm-up), the
model (channels, width, depth: ranges centred on the study's preset's own network; dropout), the covariance blend `beta` and the loss weights `lam_k`,
`lam_aux`, `lam_det` (`lam_cov` stays 1 as the scale the others are relative to). Loss weights
change what is trained, never what is scored: both objectives come from validation metrics alone.

A `--space FILE` in TOML changes it. Each top-level key is a config field:

    lr = { low = 1e-4, high = 3e-3 }      # a table overrides (part of) a range: low, high, log, step
    batch_size = { choices = [32, 64] }   # ... or gives the choices
    dropout = 0.0                         # a plain value fixes the field (it is no longer searched)
    n_train = 256                         # any config field can be fixed, or searched with a table

Fields searched by default keep the default's other bounds when a table gives only some of them.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import optuna

from hpo._errors import SpaceError
from pipeline import ConfigError, ExperimentConfig, replace

_UNSEARCHABLE = {
    "epochs": "set the number of epochs with --epochs (the pruner needs it fixed per study)",
}
_RANGE_KEYS = {"low", "high", "log", "step"}



@dataclass(frozen=True)
class FloatRange:
    low: float
    high: float
    log: bool = False
    step: float | None = None


@dataclass(frozen=True)
class IntRange:
    low: int
    high: int
    log: bool = False
    step: int = 1


@dataclass(frozen=True)
class Choice:
    choices: tuple[Any, ...]


@dataclass(frozen=True)
class Fixed:
    value: Any


Param = FloatRange | IntRange | Choice | Fixed

def _model_params(base: ExperimentConfig) -> dict[str, Param]:
    """Model-size ranges centred on the preset's own network: half to 1.5x its channels, half
    to twice its head width, its depth +-2. A trial of any preset then costs about what that
    preset's default network does (for `full`: 16-48 channels, width 64-256, depth 2-6)."""
    half = max(1, base.conv_channels // 2)
    width = base.model_width
    return {
        "conv_channels": IntRange(half, 3 * half, step=half),  # channels of the conv trunk
        "model_width": Choice((max(1, width // 2), width, 2 * width)),  # pooled head units
        "model_depth": IntRange(max(1, base.model_depth - 2), base.model_depth + 2),  # blocks
    }


def _sbl_count_params(base: ExperimentConfig) -> dict[str, Param]:
    """Model sbl_count (`pipeline._sbl_net`): SBL's front end has no weights, so the space is the
    count network (width, depth, dropout), its optimiser, the blend and the weight of the K
    cross-entropy against the covariance NMSE (the only two loss terms it trains on)."""
    width = base.model_width
    return {
        "lr": FloatRange(3e-4, 1e-2, log=True),  # peak learning rate of AdamW
        "weight_decay": FloatRange(1e-6, 1e-2, log=True),
        "batch_size": Choice((32, 64, 128)),  # scenes per step
        "warmup_frac": FloatRange(0.0, 0.2),  # share of all steps in linear warm-up
        "model_width": Choice((max(1, width // 2), width, 2 * width)),  # units per layer
        "model_depth": IntRange(1, 3),  # hidden layers of the count network
        "dropout": FloatRange(0.0, 0.3),
        "beta": FloatRange(0.0, 0.1),  # weight of R_samp in R_blend (MUSIC moves off the
        # network's sources as it grows: 99.2 % of them within 0.2 deg at 0.05, 97 % at 0.2)
        "lam_k": FloatRange(0.1, 10.0, log=True),  # loss weight of the K cross-entropy
        "count_for_success": FloatRange(0.0, 1.0),  # K_hat: most probable count .. success
    }


def default_params(base: ExperimentConfig) -> dict[str, Param]:
    """The default space for a study whose preset is `base`."""
    if base.model == "sbl_count":
        return _sbl_count_params(base)
    model = _model_params(base)
    return {
        "lr": FloatRange(1e-4, 1e-2, log=True),  # peak learning rate of AdamW
        "weight_decay": FloatRange(1e-6, 1e-2, log=True),
        "batch_size": Choice((16, 32, 64, 128)),  # scenes per step
        "warmup_frac": FloatRange(0.0, 0.2),  # share of all steps in linear warm-up
        **model,
        "dropout": FloatRange(0.0, 0.3),
        "beta": FloatRange(0.0, 0.6),  # weight of R_samp in R_blend
        "lam_k": FloatRange(0.02, 1.0, log=True),  # loss weight of the K cross-entropy
        "lam_aux": FloatRange(0.1, 3.0, log=True),  # loss weight of the matched source parameters
        "lam_det": FloatRange(0.1, 3.0, log=True),  # loss weight of the detection map
    }


# The default space of the `full` preset, for reference.
DEFAULT_PARAMS: dict[str, Param] = default_params(ExperimentConfig())


@dataclass(frozen=True)
class SearchSpace:
    """Named parameters in suggestion order; a Fixed one is applied without being suggested."""

    params: Mapping[str, Param]

    def searched(self) -> dict[str, Param]:
        return {name: p for name, p in self.params.items() if not isinstance(p, Fixed)}

    def fixed(self) -> dict[str, Any]:
        return {name: p.value for name, p in self.params.items() if isinstance(p, Fixed)}

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """JSON-able form, e.g. for the worker's argv and the study's attributes."""
        out: dict[str, dict[str, Any]] = {}
        for name, param in self.params.items():
            kind = type(param).__name__
            body = {f.name: getattr(param, f.name) for f in fields(param)}
            if isinstance(param, Choice):
                body["choices"] = list(param.choices)
            out[name] = {"kind": kind, **body}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Mapping[str, Any]]) -> SearchSpace:
        kinds = {k.__name__: k for k in (FloatRange, IntRange, Choice, Fixed)}
        params: dict[str, Param] = {}
        for name, body in data.items():
            body = dict(body)
            kind = kinds[body.pop("kind")]
            if kind is Choice:
                body["choices"] = tuple(body["choices"])
            params[name] = kind(**body)
        return cls(params)

    def describe(self) -> list[str]:
        """One human line per parameter."""
        lines = []
        for name, param in self.params.items():
            if isinstance(param, Fixed):
                lines.append(f"{name} = {param.value!r} (fixed)")
            elif isinstance(param, Choice):
                lines.append(f"{name} in {list(param.choices)}")
            else:
                scale = " log" if param.log else ""
                step = f" step {param.step}" if param.step not in (None, 1) else ""
                lines.append(f"{name} in [{param.low}, {param.high}]{scale}{step}")
        return lines


def default_space(base: ExperimentConfig | None = None) -> SearchSpace:
    return SearchSpace(default_params(base or ExperimentConfig()))


def suggest_config(
    trial: optuna.trial.BaseTrial, space: SearchSpace, base: ExperimentConfig
) -> ExperimentConfig:
    """The trial's config: `base` with the fixed values and one suggestion per searched field."""
    values: dict[str, Any] = dict(space.fixed())
    for name, param in space.searched().items():
        if isinstance(param, FloatRange):
            values[name] = trial.suggest_float(
                name, param.low, param.high, log=param.log, step=param.step
            )
        elif isinstance(param, IntRange):
            values[name] = trial.suggest_int(
                name, param.low, param.high, step=param.step, log=param.log
            )
        else:
            values[name] = trial.suggest_categorical(name, list(param.choices))
    return replace(base, **values)


def load_space(path: Path | None, base: ExperimentConfig) -> SearchSpace:
    """The default space changed by the TOML file at `path` (None: the default), checked
    against `base` so every range end and choice makes a valid config. SpaceError if not."""
    params = default_params(base)
    if path is not None:
        params.update(_read_overrides(path, base))
    space = SearchSpace(params)
    _check_space(space, base, where=str(path) if path else "default search space")
    return space


def _read_overrides(path: Path, base: ExperimentConfig) -> dict[str, Param]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpaceError(f"space file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpaceError(f"cannot read space file {path}: {getattr(e, 'strerror', e)}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpaceError(f"space file {path} is not valid TOML: {e}") from None
    known = {f.name: getattr(base, f.name) for f in fields(ExperimentConfig)}
    overrides: dict[str, Param] = {}
    for name, value in data.items():
        if name in _UNSEARCHABLE:
            raise SpaceError(
                f"space file {path}: {name!r} cannot be set here; {_UNSEARCHABLE[name]}"
            )
        if name not in known:
            searchable = ", ".join(default_params(base))
            raise SpaceError(
                f"space file {path}: unknown parameter {name!r}; searched by default: "
                f"{searchable} (any other config field can be fixed or searched too)"
            )
        overrides[name] = _parse_param(path, name, value, known[name], base)
    return overrides


def _parse_param(path: Path, name: str, value: Any, current: Any, base: ExperimentConfig
                 ) -> Param:
    where = f"space file {path}: {name}"
    kind = type(current)
    if not isinstance(value, dict):
        return Fixed(_coerce(where, value, kind))
    unknown = set(value) - _RANGE_KEYS - {"choices"}
    if unknown:
        raise SpaceError(
            f"{where} has unknown key(s) {', '.join(sorted(unknown))}; "
            "use low, high, log, step or choices"
        )
    if "choices" in value:
        if set(value) != {"choices"}:
            raise SpaceError(f"{where}: give either choices or low/high, not both")
        choices = value["choices"]
        if not isinstance(choices, list) or not choices:
            raise SpaceError(f"{where}: choices must be a non-empty list")
        return Choice(tuple(_coerce(where, c, kind) for c in choices))
    if kind not in (int, float):
        raise SpaceError(f"{where} is a {kind.__name__} field: give choices = [...], not a range")
    default = default_params(base).get(name)
    inherited: dict[str, Any] = {}
    if isinstance(default, (FloatRange, IntRange)):
        inherited = {"low": default.low, "high": default.high, "log": default.log}
    merged = {**inherited, **value}
    missing = {"low", "high"} - set(merged)
    if missing:
        raise SpaceError(f"{where}: a range needs {' and '.join(sorted(missing))}")
    log = merged.get("log", False)
    if not isinstance(log, bool):
        raise SpaceError(f"{where}: log must be true or false, but got {log!r}")
    low, high = _coerce(where, merged["low"], kind), _coerce(where, merged["high"], kind)
    if kind is int:
        step = _coerce(where, merged.get("step", 1), int)
        return IntRange(low, high, log=log, step=step)
    step = merged.get("step")
    return FloatRange(
        low, high, log=log, step=None if step is None else _coerce(where, step, float)
    )


def _coerce(where: str, value: Any, kind: type) -> Any:
    """`value` as the config field's type; TOML integers are accepted for float fields."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is float and isinstance(value, float) and not math.isfinite(value):
        raise SpaceError(f"{where} must be finite, but got {value!r}")
    if type(value) is not kind:
        raise SpaceError(f"{where} takes a {kind.__name__}, but got {value!r}")
    return value


def _check_space(space: SearchSpace, base: ExperimentConfig, *, where: str) -> None:
    # Each range end and choice is checked on the base with every fixed value applied, so that
    # fields that must agree (model sbl_count needs fresh_train=false) can be fixed together.
    fixed = space.fixed()
    try:
        anchor = replace(base, **fixed)
    except ConfigError as e:
        for name, value in fixed.items():  # name the field that is wrong on its own, if one is
            try:
                replace(base, **{name: value})
            except ConfigError as alone:
                raise SpaceError(f"{where}: {name}={value!r} is not a valid config: {alone}"
                                 ) from None
        raise SpaceError(f"{where}: the fixed values make an invalid config: {e}") from None
    for name, param in space.params.items():
        if isinstance(param, (FloatRange, IntRange)):
            if not param.low < param.high:
                raise SpaceError(
                    f"{where}: {name} needs low < high, but got low={param.low}, high={param.high}"
                )
            if param.log and param.low <= 0:
                raise SpaceError(f"{where}: {name} on a log scale needs low > 0, got {param.low}")
            if param.log and param.step not in (None, 1):
                raise SpaceError(f"{where}: {name} cannot have both log and step")
            if param.step is not None and not param.step > 0:
                raise SpaceError(f"{where}: {name} needs step > 0, but got {param.step}")
            candidates = [param.low, param.high]
        elif isinstance(param, Choice):
            candidates = list(param.choices)
            if len(set(candidates)) != len(candidates):
                raise SpaceError(f"{where}: {name} lists a choice twice: {candidates}")
        else:
            candidates = [param.value]
        for value in candidates:
            try:
                replace(anchor, **{name: value})
            except ConfigError as e:
                raise SpaceError(f"{where}: {name}={value!r} is not a valid config: {e}") from None
