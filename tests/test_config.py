import pytest

from msfin_fast import MSFIN, PRESETS, ConfigError, MSFINConfig, get_config


def test_presets_match_the_released_models():
    x4, s4 = get_config("msfin-x4"), get_config("msfin-s-x4")
    assert (x4.n_feats, x4.groups, x4.reduction, x4.num_steps, x4.scale) == (24, 6, 5, 1, 4)
    assert (s4.n_feats, s4.groups, s4.reduction, s4.num_steps, s4.scale) == (16, 4, 4, 0, 4)
    assert x4.rgb_range == s4.rgb_range == 255
    assert x4.rgb_mean == (0.4488, 0.4371, 0.4040)


@pytest.mark.parametrize("name, count", [("msfin-x4", 682_159), ("msfin-s-x4", 351_851)])
def test_parameter_counts(name, count):
    assert sum(p.numel() for p in MSFIN(name).parameters()) == count


def test_unknown_preset_names_the_choices():
    with pytest.raises(ConfigError, match="msfin-x4, msfin-s-x4"):
        get_config("msfin-x8")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"n_feats": 25}, "not divisible by groups"),
        ({"reduction": 30}, "reduction"),
        ({"scale": 0}, ">= 1"),
        ({"num_steps": -1}, "num_steps"),
        ({"n_feats": 24.0}, "must be an int"),
        ({"rgb_range": 0}, "rgb_range"),
    ],
)
def test_impossible_configs_are_refused(changes, message):
    with pytest.raises(ConfigError, match=message):
        PRESETS["msfin-x4"].replace(**changes)


def test_replace_builds_other_widths_and_scales():
    cfg = MSFINConfig(n_feats=32, groups=8, reduction=4, num_steps=2, scale=2)
    model = MSFIN(cfg)
    assert model.config is cfg
    assert model.head.out_channels == 32
    assert model.ds0_body.body[0].groups == 8
    assert model.ds0_body.num_steps == 2
