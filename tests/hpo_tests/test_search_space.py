"""The search space: defaults, the TOML overrides, and the one place that calls suggest_*."""

from __future__ import annotations

import pathlib
import re

import optuna
import pytest

from hpo._search_space import (
    DEFAULT_PARAMS,
    Choice,
    Fixed,
    FloatRange,
    IntRange,
    SearchSpace,
    SpaceError,
    load_space,
    suggest_config,
)
from pipeline import ExperimentConfig, preset, replace

ROOT = pathlib.Path(__file__).resolve().parents[2]
SMOKE = preset("smoke")


def write(tmp_path: pathlib.Path, text: str) -> pathlib.Path:
    path = tmp_path / "space.toml"
    path.write_text(text)
    return path


def test_default_space_covers_the_issue_list_and_is_valid():
    space = load_space(None, SMOKE)
    for name in (
        "lr", "weight_decay", "batch_size", "model_width", "model_depth", "conv_channels",
        "dropout", "beta",
        "lam_k", "lam_aux", "warmup_frac",
    ):  # fmt: skip
        assert name in space.searched()
    # lam_cov is the reference scale: searching it too would only rescale the loss.
    assert "lam_cov" not in space.params


def test_model_size_ranges_are_centred_on_the_preset_network():
    full = load_space(None, preset("full")).params
    assert full["conv_channels"] == IntRange(16, 48, step=16)
    assert full["model_width"] == Choice((64, 128, 256))
    assert full["model_depth"] == IntRange(2, 6)
    quick = replace(preset("quick"), model="grid")
    params = load_space(None, quick).params
    assert quick.conv_channels in range(params["conv_channels"].low,
                                        params["conv_channels"].high + 1,
                                        params["conv_channels"].step)
    assert quick.model_width in params["model_width"].choices
    assert params["model_depth"].low <= quick.model_depth <= params["model_depth"].high


def test_toml_overrides_part_of_a_range_sets_choices_and_fixes_values(tmp_path):
    path = write(
        tmp_path,
        """
        lr = { high = 3e-3 }                 # keeps the default low and log scale
        batch_size = { choices = [32, 64] }
        dropout = 0                          # an integer is fine for a float field
        n_train = 96                         # any config field can be fixed
        conv_channels = { low = 4, high = 16, step = 4 }   # ... or searched
        """,
    )
    space = load_space(path, SMOKE)
    assert space.params["lr"] == FloatRange(DEFAULT_PARAMS["lr"].low, 3e-3, log=True)
    assert space.params["batch_size"] == Choice((32, 64))
    assert space.params["dropout"] == Fixed(0.0)
    assert space.params["n_train"] == Fixed(96)
    assert space.params["conv_channels"] == IntRange(4, 16, step=4)
    assert SearchSpace.from_dict(space.to_dict()) == space


def test_suggest_config_stays_inside_the_space(tmp_path):
    space = load_space(write(tmp_path, "dropout = 0.1\nn_train = 64\n"), SMOKE)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    for _ in range(20):
        trial = study.ask()
        config = suggest_config(trial, space, SMOKE)
        assert isinstance(config, ExperimentConfig)
        assert config.dropout == 0.1 and config.n_train == 64
        assert 1e-4 <= config.lr <= 1e-2
        assert config.batch_size in (16, 32, 64, 128)
        # Model sizes centred on smoke's own network (8 channels, width 32, depth 2).
        assert 1 <= config.model_depth <= 4
        assert config.conv_channels in (4, 8, 12)
        assert config.model_width in (16, 32, 64)
        assert set(trial.params) == set(space.searched())
        study.tell(trial, 0.0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("lr = [1e-4", "is not valid TOML"),
        ("lrr = { low = 1e-4, high = 1e-2 }", "unknown parameter 'lrr'"),
        ("lr = { low = 1e-2, high = 1e-4 }", "needs low < high"),
        ("lr = { low = 0.0, high = 1e-2 }", "log scale needs low > 0"),
        ("lr = { lo = 1e-4 }", "unknown key(s) lo"),
        ("model_depth = { low = 1.5, high = 3 }", "takes a int"),
        ("dropout = { low = 0.0, high = 1.5 }", "dropout=1.5 is not a valid config"),
        ("batch_size = { choices = [] }", "non-empty list"),
        ("batch_size = { choices = [32, 32] }", "lists a choice twice"),
        ("cov_head = { low = 1, high = 2 }", "give choices"),
        ("cov_head = 'nonsense'", "cov_head='nonsense' is not a valid config"),
        ("epochs = 3", "--epochs"),
        ("n_train = { low = 64 }", "a range needs high"),
        ("amp = 'yes'", "takes a bool"),
    ],
)
def test_bad_space_files_are_one_line_errors(tmp_path, text, expected):
    with pytest.raises(SpaceError) as info:
        load_space(write(tmp_path, text), SMOKE)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_space_file(tmp_path):
    with pytest.raises(SpaceError, match="does not exist"):
        load_space(tmp_path / "absent.toml", SMOKE)


def test_the_search_space_module_is_the_only_caller_of_suggest():
    callers = []
    for package in ("hpo", "pipeline", "storage", "bench"):
        for path in (ROOT / package).rglob("*.py"):
            if re.search(
                r"\.suggest_(float|int|categorical|uniform|loguniform)\(", path.read_text()
            ):
                callers.append(path.relative_to(ROOT).as_posix())
    assert callers == ["hpo/_search_space.py"]


def test_sbl_count_presets_get_their_own_space_and_objective():
    from hpo._strategies import default_objective

    for name in ("quick", "medium"):
        base = preset(name)
        assert base.model == "sbl_count"
        params = load_space(None, base).params
        # the count network's knobs, none of the detection-map network's
        assert {"model_width", "model_depth", "dropout", "beta", "lam_k", "lr"} <= set(params)
        assert not {"conv_channels", "lam_aux", "lam_det"} & set(params)
        assert params["beta"].high <= 0.1  # MUSIC on R_blend keeps the network's sources
        assert default_objective(base) == "success"
    assert default_objective(preset("smoke")) == "composite"


def test_fields_that_must_agree_can_be_fixed_together(tmp_path):
    path = tmp_path / "space.toml"
    path.write_text('model = "sbl_count"\nfresh_train = false\nbeta = { low = 0.0, high = 0.1 }\n')
    space = load_space(path, preset("smoke"))
    assert space.fixed() == {"model": "sbl_count", "fresh_train": False}
    path.write_text('model = "sbl_count"\n')  # smoke draws fresh scenes per epoch
    with pytest.raises(SpaceError, match="model='sbl_count' is not a valid config: .*fresh_train"):
        load_space(path, preset("smoke"))
