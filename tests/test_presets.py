"""``preset:``: a named configuration, merged under the user's own sections; the same through every entry point."""

import pytest
import torch

from safeguard_plugin.config import ConfigError, load_config
from safeguard_plugin.constraints.adaptive_kl.constraint import risk_weights
from safeguard_plugin.presets import PRESETS, apply_preset, merge


def test_recommended_expands_to_its_sections():
    cfg = load_config({"artifact": "a", "preset": "recommended"})
    assert set(cfg.constraint_configs()) == set(PRESETS["recommended"])
    for name, settings in PRESETS["recommended"].items():
        section = cfg.section(name).model_dump()
        assert all(section[k] == v for k, v in settings.items()), (name, section)


def test_user_sections_override_key_by_key_and_can_switch_one_off():
    name, settings = next(iter(PRESETS["recommended"].items()))
    key = next(k for k, v in settings.items() if isinstance(v, float))
    cfg = load_config({"artifact": "a", "preset": "recommended", name: {key: 0.5}})
    assert getattr(cfg.section(name), key) == 0.5
    others = {k: v for k, v in settings.items() if k != key}
    assert all(getattr(cfg.section(name), k) == v for k, v in others.items())  # the rest still from the preset
    off = load_config({"artifact": "a", "preset": "recommended", name: {"enabled": False}})
    assert name not in off.constraint_configs() and off.constraint_configs()
    extra = load_config({"artifact": "a", "preset": "recommended", "monitor": {"every_n_steps": 5}})
    assert set(extra.constraint_configs()) == set(PRESETS["recommended"]) | {"monitor"}


def test_merge_is_recursive_and_does_not_touch_the_preset():
    base = {"a": {"x": 1, "y": {"z": 2}}, "b": [1]}
    out = merge(base, {"a": {"y": {"w": 3}}, "b": [2]})
    assert out == {"a": {"x": 1, "y": {"z": 2, "w": 3}}, "b": [2]}
    assert base == {"a": {"x": 1, "y": {"z": 2}}, "b": [1]}
    before = repr(PRESETS)
    apply_preset({"preset": "recommended", next(iter(PRESETS["recommended"])): {"enabled": False}})
    assert repr(PRESETS) == before


@pytest.mark.parametrize("value, pattern", [("nope", r"preset: unknown preset 'nope'; available: recommended"),
                                            (3, r"preset: unknown preset 3")])
def test_unknown_preset_is_refused_naming_the_choices(value, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config({"artifact": "a", "preset": value})


def test_preset_errors_name_the_section_key():
    name = next(iter(PRESETS["recommended"]))
    with pytest.raises(ConfigError, match=rf"{name}\.no_such_key: Extra inputs are not permitted"):
        load_config({"artifact": "a", "preset": "recommended", name: {"no_such_key": 1}})


def test_revalidating_a_preset_config_is_idempotent():
    cfg = load_config({"artifact": "a", "preset": "recommended", "procon": {"weight": 7.0}})
    again = load_config(cfg)
    assert {k: v.model_dump() for k, v in again.constraint_configs().items()} == \
        {k: v.model_dump() for k, v in cfg.constraint_configs().items()}


def test_axolotl_block_accepts_the_preset():
    pytest.importorskip("safeguard_plugin.integrations.axolotl.args")
    from safeguard_plugin.integrations.axolotl.args import validate_block

    cfg = validate_block({"artifact": "a", "preset": "recommended"})
    assert set(cfg.constraint_configs()) == set(PRESETS["recommended"])


def test_weight_bounds_let_a_high_risk_example_drop_its_sft_term():
    s = torch.tensor([1.0, 3.5, 5.0])
    w_sft, w_kl = risk_weights(s)  # the paper's bounds
    assert w_sft.tolist() == pytest.approx([0.9, 0.5, 0.1]) and w_kl.tolist() == pytest.approx([0.1, 0.5, 0.9])
    w_sft, w_kl = risk_weights(s, bounds=(0.0, 1.0))
    assert w_sft.tolist() == pytest.approx([1.0, 0.5, 0.0]) and w_kl.tolist() == pytest.approx([0.0, 0.5, 1.0])
    with pytest.raises(ConfigError, match=r"weight_bounds: need 0 <= lo <= 0.5 <= hi <= 1, got \[0.6, 0.9\]"):
        load_config({"artifact": "a", "adaptive_kl": {"weight_bounds": [0.6, 0.9]}})


def test_example_yaml_loads_the_preset():
    from pathlib import Path

    cfg = load_config(Path(__file__).parents[1] / "example_yamls" / "recommended.yaml")
    assert cfg.preset == "recommended" and set(cfg.constraint_configs()) == set(PRESETS["recommended"])


@pytest.mark.parametrize("kind", ["callback", "mixin"])
def test_the_preset_trains_through_trl_with_each_of_its_constraints(artifact_dir, tok, chat_rows, tmp_path, kind):
    from helpers import train

    tr, _ = train(kind, chat_rows, tok, tmp_path, {"artifact": str(artifact_dir), "preset": "recommended"}, lora=True,
                  max_steps=2)
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert len(logs) == 2 and all("safeguard/procon_loss" in h and "safeguard/akl_risk_mean" in h
                                    and "safeguard/anchor_kl" in h for h in logs)
