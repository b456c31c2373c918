"""One config type for the whole pipeline, and its named presets.

`ExperimentConfig` is a frozen, keyword-only, flat dataclass: the search space builds one, training
consumes one, and every checkpoint and trial stores one (`config_to_dict`). Variants are made with
`dataclasses.replace` or, from text, with `apply_overrides(config, ["field=value", ...])`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any

from pipeline._errors import ConfigError

SPEED_OF_LIGHT_M_S = 3.0e8  # so that 1 GHz gives the 0.3 m wavelength of SYSTEM.md


@dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    # --- system (SYSTEM.md §1-2) ---
    carrier_hz: float = 1.0e9  # carrier frequency, Hz (wavelength 0.3 m)
    n_ris_rows: int = 12  # RIS elements along y
    n_ris_cols: int = 12  # RIS elements along z; N = rows * cols
    n_bs_antennas: int = 16  # M, base-station antennas (ULA, half-wavelength)
    n_snapshots: int = 16  # L, snapshots per scene, one RIS code each
    max_sources: int = 5  # K_max; K is uniform on 1..max_sources
    azimuth_max_deg: float = 60.0  # field of view: azimuth in [-max, max], degrees
    elevation_max_deg: float = 30.0  # field of view: elevation in [-max, max], degrees
    range_min_m: float = 0.5  # nearest source, metres
    range_max_m: float = 10.0  # farthest source, metres
    min_separation_deg: float = 3.0  # two sources closer than this in both angles are redrawn
    source_power_db_max: float = 20.0  # strongest source power, dB re 1 (unscaled R_true trace ~1e4)
    power_range_db: float = 10.0  # source powers uniform in dB over [max - range, max]
    snr_db_min: float = -5.0  # per-scene target SNR, dB, lower end
    snr_db_max: float = 20.0  # per-scene target SNR, dB, upper end
    coherent_symbols: bool = False  # True repeats each source's symbol across snapshots (rank one)
    rician_k: float = 10.0  # BS-RIS Rician K-factor, a power ratio (not dB)
    bs_distance_m: float = 20.0  # BS array centre distance from the RIS centre, metres
    bs_azimuth_deg: float = 35.0  # BS direction seen from the RIS, degrees
    code_bits: int = 3  # RIS phase quantisation, bits
    deployment_seed: int = 1234  # draws the channel G and the code subset; fixed per deployment
    ridge: float = 0.01  # regulariser of the back-projection, relative to mean eig of Phi Phi^H

    # --- data (SYSTEM.md §6) ---
    seed: int = 0  # data and init seed; train/val/test streams are SeedSequence(seed).spawn(3)
    n_train: int = 10_000  # training scenes per epoch
    n_val: int = 1_000  # fixed validation scenes
    fresh_train: bool = True  # True: new training scenes every epoch; False: one fixed set

    # --- model ---
    model: str = "grid"  # "grid": detection-map network; "sbl_count": SBL front end + count net
    count_for_success: float = 0.0  # sbl_count: K_hat maximises log P(K=k) + this * log q_k
    # sbl_count, at inference: each source's range is the one whose +-0.5 m holds the most
    # posterior mass (pipeline._range_decision); False: the likelihood's peak, as SBL's row
    range_for_success: bool = True
    cov_head: str = "manifold"  # "manifold": F from predicted steering vectors; "free": free factor
    factor_rank: int = 8  # columns of the free factor F (cov_head="free")
    n_grid_azimuth: int = 25  # feature grid of the matched-filter spectrum, azimuth points
    n_grid_elevation: int = 13  # feature grid, elevation points
    n_grid_range: int = 6  # feature grid, range points (log-spaced)
    conv_channels: int = 32  # channels of the convolutional trunk
    model_width: int = 128  # hidden units of the pooled head (K logits, shrinkage, free factor)
    model_depth: int = 4  # residual blocks of the convolutional trunk
    dropout: float = 0.0  # dropout probability (channels of the trunk, units of the head)

    # --- covariance and losses (SYSTEM.md §3-4) ---
    beta: float = 0.2  # blend weight of R_samp in R_blend, in [0, 1]
    diag_loading: float = 0.0  # delta of delta*I, applied to R_blend only at inference
    lam_cov: float = 1.0  # weight of the covariance NMSE
    lam_k: float = 0.2  # weight of the K cross-entropy
    lam_aux: float = 1.0  # weight of the Hungarian-matched source parameter loss
    lam_det: float = 1.0  # weight of the detection-map loss (focal objectness + cell offsets)
    lam_gap: float = 0.0  # weight of the eigengap term; 0 = off (Fix 3)

    # --- optimisation ---
    epochs: int = 12  # epochs per run
    batch_size: int = 64  # scenes per optimisation step
    lr: float = 2e-3  # peak learning rate of AdamW
    weight_decay: float = 1e-4  # AdamW weight decay
    warmup_frac: float = 0.05  # share of all steps spent in linear warm-up, then cosine to 0
    grad_clip: float = 1.0  # max global gradient norm
    amp: bool = True  # autocast the network's trunk on CUDA (heads and loss stay float32)
    amp_dtype: str = "bfloat16"  # "bfloat16" (no scaler, no host sync) or "float16" (+ scaler)

    # --- evaluation (SYSTEM.md §5) ---
    music_grid_azimuth: int = 61  # MUSIC coarse grid, azimuth points
    music_grid_elevation: int = 31  # MUSIC coarse grid, elevation points
    music_grid_range: int = 9  # MUSIC coarse grid, range points
    music_refine_steps: int = 3  # rounds of local refinement around each peak (0 = none)
    n_val_localize: int = 1_000  # validation scenes localized with MUSIC each epoch

    # --- fault injection, for tests of the HPO layer ---
    fault_nonfinite_epoch: int = 0  # >0: make the loss NaN at this epoch (1-based); 0 = off

    def __post_init__(self) -> None:
        validate(self)

    # Derived quantities live here so that nobody recomputes them differently.
    @property
    def n_elements(self) -> int:
        return self.n_ris_rows * self.n_ris_cols

    @property
    def wavelength_m(self) -> float:
        return SPEED_OF_LIGHT_M_S / self.carrier_hz

    @property
    def wavenumber(self) -> float:
        return 2.0 * math.pi / self.wavelength_m


_CHOICES: dict[str, tuple[str, ...]] = {
    "model": ("grid", "sbl_count"),
    "cov_head": ("manifold", "free"),
    "amp_dtype": ("float16", "bfloat16"),
}
_PROBABILITIES = ("beta", "dropout", "warmup_frac", "count_for_success")
_NON_NEGATIVE = (
    "lam_cov", "lam_k", "lam_aux", "lam_det", "lam_gap", "weight_decay", "diag_loading",
    "power_range_db", "min_separation_deg", "rician_k", "music_refine_steps",
    "fault_nonfinite_epoch", "seed", "deployment_seed", "n_val_localize",
)
_POSITIVE = (
    "carrier_hz", "n_ris_rows", "n_ris_cols", "n_bs_antennas", "n_snapshots", "max_sources",
    "azimuth_max_deg", "elevation_max_deg", "range_min_m", "bs_distance_m", "code_bits", "ridge",
    "n_train", "n_val", "factor_rank", "n_grid_azimuth", "n_grid_elevation", "n_grid_range",
    "conv_channels", "model_width", "epochs", "batch_size", "lr", "grad_clip",
    "music_grid_azimuth", "music_grid_elevation", "music_grid_range",
)


def validate(config: ExperimentConfig) -> None:
    """Raise ConfigError naming the first field whose value is out of range."""
    for name, allowed in _CHOICES.items():
        value = getattr(config, name)
        if value not in allowed:
            raise ConfigError(f"{name} must be one of {', '.join(allowed)}, but got {value!r}")
    for name in _POSITIVE:
        if not getattr(config, name) > 0:
            raise ConfigError(f"{name} must be > 0, but got {getattr(config, name)!r}")
    for name in _NON_NEGATIVE:
        if not getattr(config, name) >= 0:
            raise ConfigError(f"{name} must be >= 0, but got {getattr(config, name)!r}")
    for name in _PROBABILITIES:
        if not 0.0 <= getattr(config, name) <= 1.0:
            raise ConfigError(f"{name} must be in [0, 1], but got {getattr(config, name)!r}")
    if config.model_depth < 1:
        raise ConfigError(f"model_depth must be >= 1, but got {config.model_depth!r}")
    grid_points = config.n_grid_range * config.n_grid_elevation * config.n_grid_azimuth
    if grid_points < config.max_sources:
        raise ConfigError(f"the feature grid has {grid_points} cells, fewer than max_sources")
    if config.model == "sbl_count" and config.fresh_train:
        raise ConfigError("model sbl_count trains on one fixed set (its SBL front end is computed "
                          "once per scene): set fresh_train=false")
    if config.range_max_m <= config.range_min_m:
        raise ConfigError(
            f"range_max_m must exceed range_min_m, but got {config.range_max_m!r} <= "
            f"{config.range_min_m!r}"
        )
    if config.snr_db_max < config.snr_db_min:
        raise ConfigError(
            f"snr_db_max must be >= snr_db_min, but got {config.snr_db_max!r} < {config.snr_db_min!r}"
        )
    if not config.azimuth_max_deg < 90 or not config.elevation_max_deg < 90:
        raise ConfigError("azimuth_max_deg and elevation_max_deg must be below 90")


PRESETS: dict[str, ExperimentConfig] = {
    # Seconds on a CPU: a small array, few scenes. For tests and for checking an installation.
    "smoke": ExperimentConfig(
        n_ris_rows=6, n_ris_cols=6, n_bs_antennas=8, n_snapshots=8, max_sources=3,
        range_max_m=4.0, n_train=128, n_val=32, epochs=2, batch_size=32,
        n_grid_azimuth=13, n_grid_elevation=7, n_grid_range=3, conv_channels=8, model_width=32,
        model_depth=2,
        music_grid_azimuth=25, music_grid_elevation=13, music_grid_range=5, n_val_localize=32,
    ),
    # The CPU search: a reduced system (8 x 8 RIS, M = 8, L = 8, K <= 3), the SBL count network
    # (pipeline._sbl_net) on one fixed set whose SBL front end the study computes once (about a
    # minute) and every trial shares; sized so that README's `hpo run --trials 200 --preset
    # quick` fits 15 minutes on a 2-core machine.
    "quick": ExperimentConfig(
        n_ris_rows=8, n_ris_cols=8, n_bs_antennas=8, n_snapshots=8, max_sources=3,
        range_max_m=4.0, n_train=2_000, n_val=300, epochs=5, fresh_train=False,
        model="sbl_count", model_width=64, model_depth=2, lr=3e-3, lam_aux=0.0, lam_det=0.0,
        beta=0.05, count_for_success=0.5,
        n_grid_azimuth=19, n_grid_elevation=9, n_grid_range=4, conv_channels=16,
        music_grid_azimuth=37, music_grid_elevation=19, music_grid_range=7, n_val_localize=300,
    ),
    # One CPU training run at the real array size (N = 144, M = 16, L = 16, K <= 5) within the
    # resolvable range: the SBL count network on 4,000 fixed scenes, about 10 minutes on a 2-core
    # CPU, most of it the SBL front end (RESULTS.md).
    "medium": ExperimentConfig(
        range_max_m=4.0, n_train=4_000, n_val=300, epochs=6, n_val_localize=300,
        fresh_train=False, model="sbl_count", model_width=64, model_depth=2, lr=3e-3,
        lam_aux=0.0, lam_det=0.0, beta=0.05, count_for_success=0.25,
    ),
    # The system at its real size (SYSTEM.md §6 defaults).
    "full": ExperimentConfig(),
}


def preset(name: str) -> ExperimentConfig:
    """The named preset; ConfigError listing the names when it does not exist."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}"
        ) from None


def field_names() -> list[str]:
    return [f.name for f in fields(ExperimentConfig)]


def _parse_value(name: str, text: str, current: Any) -> Any:
    kind = type(current)
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name} takes true or false, but got {text!r}")
    if kind is int:
        try:
            as_float = float(text)
        except ValueError:
            raise ConfigError(f"{name} takes an integer, but got {text!r}") from None
        if not as_float.is_integer():
            raise ConfigError(f"{name} takes an integer, but got {text!r}")
        return int(as_float)
    if kind is float:
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"{name} takes a number, but got {text!r}") from None
        if not math.isfinite(value):
            raise ConfigError(f"{name} takes a finite number, but got {text!r}")
        return value
    return text


def apply_overrides(config: ExperimentConfig, assignments: list[str]) -> ExperimentConfig:
    """Apply "field=value" strings; ConfigError for an unknown field or a bad value."""
    changes: dict[str, Any] = {}
    names = field_names()
    for assignment in assignments:
        name, sep, text = assignment.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ConfigError(f"--set takes field=value, but got {assignment!r}")
        if name not in names:
            raise ConfigError(
                f"unknown config field {name!r}; fields are: {', '.join(names)}"
            )
        changes[name] = _parse_value(name, text, getattr(config, name))
    return replace(config, **changes)


def replace(config: ExperimentConfig, **changes: Any) -> ExperimentConfig:
    """dataclasses.replace that reports unknown fields as ConfigError."""
    unknown = sorted(set(changes) - set(field_names()))
    if unknown:
        raise ConfigError(f"unknown config field(s) {', '.join(unknown)}")
    return dataclasses.replace(config, **changes)


def config_to_dict(config: ExperimentConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_dict(data: dict[str, Any]) -> ExperimentConfig:
    """Rebuild a config from config_to_dict output; unknown keys are an error, missing ones default."""
    unknown = sorted(set(data) - set(field_names()))
    if unknown:
        raise ConfigError(f"unknown config field(s) {', '.join(unknown)}")
    return ExperimentConfig(**data)
