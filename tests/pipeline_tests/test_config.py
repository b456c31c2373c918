from __future__ import annotations

import dataclasses

import pytest

from pipeline import (
    PRESETS,
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    preset,
)


def test_full_preset_is_the_real_system():
    full = PRESETS["full"]
    assert (full.n_elements, full.n_bs_antennas, full.n_snapshots, full.max_sources) == (
        144, 16, 16, 5)
    assert (full.n_train, full.n_val, full.epochs) == (10_000, 1_000, 12)
    assert full.wavelength_m == pytest.approx(0.3)
    assert full.lam_gap == 0.0


def test_config_is_frozen_and_round_trips():
    config = preset("quick")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 1.0  # type: ignore[misc]
    assert config_from_dict(config_to_dict(config)) == config


def test_overrides_parse_and_validate():
    config = apply_overrides(ExperimentConfig(), ["lr=0.01", "epochs=3", "amp=false",
                                                  "cov_head=free"])
    assert (config.lr, config.epochs, config.amp, config.cov_head) == (0.01, 3, False, "free")


@pytest.mark.parametrize("assignment, fragment", [
    ("nope=1", "unknown config field 'nope'"),
    ("lr", "field=value"),
    ("epochs=2.5", "integer"),
    ("lr=abc", "number"),
    ("beta=1.5", "beta must be in [0, 1]"),
    ("epochs=0", "epochs must be > 0"),
    ("cov_head=magic", "cov_head must be one of manifold, free"),
    ("amp=maybe", "true or false"),
    ("lr=nan", "finite"),
])
def test_bad_overrides_name_the_problem(assignment, fragment):
    with pytest.raises(ConfigError, match=None) as info:
        apply_overrides(ExperimentConfig(), [assignment])
    assert fragment in str(info.value)


def test_unknown_field_error_lists_the_fields():
    with pytest.raises(ConfigError) as info:
        apply_overrides(ExperimentConfig(), ["nope=1"])
    assert "lam_cov" in str(info.value) and "batch_size" in str(info.value)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ConfigError, match="smoke, quick, medium, full"):
        preset("huge")
