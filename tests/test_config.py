from pathlib import Path

import pytest
import yaml

from safeguard_plugin.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_valid_dict_and_yaml(tmp_path):
    cfg = load_config({"artifact": "a", "procon": {"weight": 3, "warmup_ratio": 0.2}})
    assert cfg.section("procon").weight == 3.0
    y = tmp_path / "sub" / "safeguard.yaml"
    y.parent.mkdir()
    y.write_text("safeguard:\n  artifact: art\n  procon: {weight: 2.0}\n")
    cfg = load_config(y)
    assert cfg.artifact == str(y.parent / "art")  # relative to the YAML file
    assert set(cfg.constraint_configs()) == {"procon"}


@pytest.mark.parametrize(
    "data, pattern",
    [
        ({"procon": {"wieght": 1}}, r"procon\.wieght: Extra inputs are not permitted"),
        ({"procon": {"weight": "heavy"}}, r"procon\.weight: Input should be a valid number"),
        ({"procon": {"weight": -1}}, r"procon\.weight: Input should be greater than or equal to 0"),
        ({"procon": {"warmup_ratio": 2}}, r"procon\.warmup_ratio: Input should be less than or equal to 1"),
        ({"procon": {"positions": "first"}}, r"procon\.positions: Input should be 'selected', 'last' or 'all'"),
        ({"procn": {}}, r"unknown key 'procn'; allowed keys: .*procon"),
        ({"nan_policy": "ignore", "procon": {}}, r"nan_policy: Input should be 'skip' or 'raise'"),
        ({"procon": [1, 2]}, r"'procon' must be a mapping"),
    ],
)
def test_errors_name_the_key(data, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(data)


def test_config_that_changes_nothing_is_an_error():
    with pytest.raises(ConfigError, match="enables no constraint"):
        load_config({"artifact": "x"})
    with pytest.raises(ConfigError, match="enables no constraint"):
        load_config({"procon": {"enabled": False}})


def test_bad_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("procon: {weight: 1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(p)


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "example_yamls").glob("*.yaml")
                                        if not p.name.startswith("axolotl_")))
def test_trl_example_yamls_share_one_shape(name):
    """Every TRL example nests its settings under ``safeguard:`` (the Axolotl suite validates that block alone)."""
    raw = yaml.safe_load((ROOT / "example_yamls" / name).read_text())
    assert list(raw) == ["safeguard"], f"{name}: put the settings under a top-level `safeguard:` key"
    assert load_config(ROOT / "example_yamls" / name).constraint_configs()
