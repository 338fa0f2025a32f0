"""Issue 14, items 3, 8 (and 17's zero weight): configs that would let a constraint do nothing, or hide errors.

* non-finite weights (and every other non-finite float) are refused in every constraint's section; weights that
  overflow float32 once multiplied by ProCon's warm-up factor are refused; ``procon.weight: 0`` warns;
* every invalid key is reported in one message; numbers and booleans are strict (no ``"1e3"``, ``true`` or ``"no"``);
* a mapping with a top-level ``safeguard:`` key works wherever a config is accepted.
"""

from __future__ import annotations

import re
import typing
import warnings
from pathlib import Path

import pytest
from pydantic import BaseModel

from safeguard_plugin.config import ConfigError, SafeguardConfig, load_config
from safeguard_plugin.registry import available_constraints


def _yaml(tmp_path, text):
    p = tmp_path / "safeguard.yaml"
    p.write_text(text)
    return p


# ------------------------------------------------------------------------------------------- (3) weights
@pytest.mark.parametrize("text, key", [
    ("procon: {weight: .inf}\n", "procon.weight"),
    ("procon: {weight: .nan}\n", "procon.weight"),
    ("procon: {weight: 100, warmup_factor: .inf}\n", "procon.warmup_factor"),
    ("cwac: {sae_weight: .inf}\n", "cwac.sae_weight"),
    ("safeguard:\n  guardspace: {lora_alpha: .inf}\n", "guardspace.lora_alpha"),
    ("safeguard:\n  monitor: {max_score_drop: .inf}\n", "monitor.max_score_drop"),
])
def test_non_finite_weights_are_refused_from_yaml(tmp_path, text, key):
    with pytest.raises(ConfigError, match=rf"{key}: Input should be a finite number \(got float (inf|nan)"):
        load_config(_yaml(tmp_path, text))


def _float_fields(model, prefix=""):
    """Dotted paths of a config's float fields, nested blocks (e.g. ``calibration``) included."""
    for field, info in model.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            yield from _float_fields(info.annotation, f"{prefix}{field}.")
        elif typing.get_origin(info.annotation) is list and typing.get_args(info.annotation) == (float,):
            yield f"{prefix}{field}.0"  # a list of floats: its first item
        elif float in typing.get_args(info.annotation) or info.annotation is float:
            yield f"{prefix}{field}"


def _nested(path: str, value):
    head, _, rest = path.partition(".")
    if rest == "0":  # a list of floats (e.g. adaptive_kl.weight_bounds): the bad value first, a valid one after
        return {head: [value, 0.9]}
    return {head: _nested(rest, value) if rest else value}


@pytest.mark.parametrize("name, field", [(name, f) for name, cls in sorted(available_constraints().items())
                                         for f in _float_fields(cls.config_class)])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_every_float_of_every_constraint_must_be_finite(name, field, value):
    assert {"procon", "cwac", "adaptive_kl", "guardspace", "monitor"} <= set(available_constraints())
    with pytest.raises(ConfigError, match=rf"(^|; |: ){name}\.{re.escape(field)}: Input should be a finite number"):
        load_config({"artifact": "a", name: _nested(field, value)})


def test_nested_float_fields_are_covered():
    fields = {(name, f) for name, cls in available_constraints().items() for f in _float_fields(cls.config_class)}
    assert {("cwac", "calibration.energy"), ("guardspace", "calibration.max_covariance_gb")} <= fields


@pytest.mark.parametrize("section, pattern", [
    ({"procon": {"weight": 1e30}}, r"procon\.weight: 1e\+30 is too large: penalty weights above 1e\+12 overflow"),
    ({"cwac": {"sae_weight": 1e30}}, r"cwac\.sae_weight: 1e\+30 is too large"),
    # within the bound alone, but not once multiplied by the warm-up factor
    ({"procon": {"weight": 1e12, "warmup_factor": 10}},
     r"procon: weight × warmup_factor \(1e\+12 × 10, the λ during warm-up\) = 1e\+13 is too large"),
    ({"procon": {"weight": 1e9, "warmup_factor": 1e4}}, r"procon: weight × warmup_factor .* = 1e\+13 is too large"),
])
def test_weights_that_overflow_float32_are_refused(section, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config({"artifact": "a", **section})


def test_large_but_safe_weights_are_accepted():
    assert load_config({"artifact": "a", "procon": {"weight": 1e11, "warmup_factor": 10}}).section("procon").weight == 1e11
    assert load_config({"artifact": "a", "procon": {"weight": 1e12, "warmup_factor": 1}}).section("procon").weight == 1e12
    assert load_config({"artifact": "a", "cwac": {"sae_weight": 0}}).section("cwac").sae_weight == 0.0


def test_zero_procon_weight_warns_at_setup(artifact_dir, tok):
    from safeguard_plugin.engine import SafeguardEngine
    from safeguard_plugin.testing import tiny_model

    with pytest.warns(UserWarning, match=r"procon\.weight is 0: ProCon adds no penalty.*set a weight > 0"):
        SafeguardEngine({"artifact": str(artifact_dir), "procon": {"weight": 0}}).setup(tiny_model(), tok)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a non-zero weight: no such warning
        SafeguardEngine({"artifact": str(artifact_dir), "procon": {"weight": 1}}).setup(tiny_model(), tok)


# ------------------------------------------------------------------------------------------- (8) all errors
def test_every_invalid_key_is_reported_in_one_message():
    data = {"check_first_steps": 0, "nan_policy": "ignore", "procn": {},
            "procon": {"weight": "heavy", "warmup_ratio": 2}, "monitor": {"every_n_steps": 0}}
    with pytest.raises(ConfigError) as err:
        load_config(data)
    msg = str(err.value)
    for part in ["check_first_steps: Input should be greater than or equal to 1",
                 "nan_policy: Input should be 'skip' or 'raise'",
                 "unknown key 'procn'",
                 "procon.weight: Input should be a valid number (got str 'heavy'",
                 "procon.warmup_ratio: Input should be less than or equal to 1",
                 "monitor.every_n_steps: Input should be greater than or equal to 1"]:
        assert part in msg, (part, msg)


def test_every_invalid_key_is_reported_from_yaml(tmp_path):
    p = _yaml(tmp_path, "safeguard:\n  check_first_steps: -1\n  procon: {weight: .inf, positions: first}\n")
    with pytest.raises(ConfigError, match=r"check_first_steps: .*; procon\.weight: .*finite.*; procon\.positions: "):
        load_config(p)


@pytest.mark.parametrize("data, pattern", [
    ({"procon": {"weight": "1e3"}}, r"procon\.weight: Input should be a valid number \(got str '1e3'; write the number "
                                    r"without quotes\)"),
    ({"procon": {"weight": True}}, r"procon\.weight: Input should be a valid number \(got bool True; a boolean is not"),
    ({"strict_fingerprint": "no", "procon": {}}, r"strict_fingerprint: Input should be a valid boolean \(got str 'no'; "
                                                 r"write true or false"),
    ({"strict_fingerprint": 0, "procon": {}}, r"strict_fingerprint: Input should be a valid boolean"),
    ({"check_first_steps": "3", "procon": {}}, r"check_first_steps: Input should be a valid integer \(got str '3'"),
    ({"check_first_steps": True, "procon": {}}, r"check_first_steps: Input should be a valid integer \(got bool"),
    ({"check_first_steps": 3.0, "procon": {}}, r"check_first_steps: Input should be a valid integer \(got float 3\.0"),
    ({"procon": {"enabled": "false"}}, r"procon\.enabled: Input should be a valid boolean"),
    ({"procon": {"normalize": "no"}}, r"procon\.normalize: Input should be a valid boolean"),
    ({"procon": {"warmup_steps": "2"}}, r"procon\.warmup_steps: Input should be a valid integer"),
    ({"artifact": "a", "cwac": {"projection": "yes"}}, r"cwac\.projection: Input should be a valid boolean"),
    ({"artifact": "a", "guardspace": {"rank": "8"}}, r"guardspace\.rank: Input should be a valid integer"),
    ({"artifact": "a", "guardspace": {"use_projector": 1}}, r"guardspace\.use_projector: Input should be a valid boolean"),
    ({"artifact": "a", "monitor": {"every_n_steps": "10"}}, r"monitor\.every_n_steps: Input should be a valid integer"),
    ({"artifact": "a", "adaptive_kl": {"missing_risk": "5"}}, r"adaptive_kl\.missing_risk: Input should be a valid number"),
    ({"adaptive_kl": {"risk": "constant", "risk_options": {"score": "2"}}},
     r"adaptive_kl\.risk_options\.score: Input should be a valid number"),
])
def test_numbers_and_booleans_are_strict(data, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(data)


def test_quoted_number_in_yaml_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"procon\.weight: Input should be a valid number \(got str '1e3'"):
        load_config(_yaml(tmp_path, 'procon: {weight: "1e3"}\n'))
    with pytest.raises(ConfigError, match=r"strict_fingerprint: Input should be a valid boolean \(got str 'no'"):
        load_config(_yaml(tmp_path, 'strict_fingerprint: "no"\nprocon: {}\n'))


def test_ints_for_floats_and_python_forms_are_accepted(tmp_path):
    import numpy as np

    cfg = load_config({"artifact": Path("art"), "procon": {"weight": 3, "layers": (1, 2)},
                       "guardspace": {"rank": np.int64(4), "target_modules": ("q_proj", "v_proj"), "lora_alpha": 8}})
    assert cfg.artifact == "art"
    p, g = cfg.section("procon"), cfg.section("guardspace")
    assert isinstance(p.weight, float) and p.weight == 3.0 and p.layers == [1, 2]
    assert g.rank == 4 and type(g.rank) is int and g.target_modules == ["q_proj", "v_proj"] and g.lora_alpha == 8.0
    assert load_config(cfg).section("procon") == p  # an existing config re-validates


# ------------------------------------------------------------------------------------------- (8) safeguard: key
def test_dict_with_safeguard_key_is_accepted_like_the_yaml(tmp_path):
    inner = {"artifact": "a", "procon": {"weight": 7}}
    from_yaml = load_config(_yaml(tmp_path, "safeguard:\n  artifact: a\n  procon: {weight: 7}\n"))
    for cfg in (load_config({"safeguard": inner}), SafeguardConfig.model_validate({"safeguard": inner}),
                load_config({"safeguard": inner, "base_model": "x", "datasets": []})):  # an Axolotl-style dict
        assert cfg.section("procon").weight == 7.0 == from_yaml.section("procon").weight
    with pytest.raises(ConfigError, match=r"procon\.weight: Input should be a valid number"):
        load_config({"safeguard": {"procon": {"weight": "x"}}})
    with pytest.raises(ConfigError, match="'safeguard' must be a mapping"):
        load_config({"safeguard": [1]})


def test_safeguard_key_in_callback_and_mixin(artifact_dir, tok, tmp_path):
    from datasets import Dataset

    from safeguard_plugin.integrations.trl import SafeguardCallback, SafeguardSFTTrainer
    from safeguard_plugin.testing import tiny_model

    from helpers import sft_args

    block = {"safeguard": {"artifact": str(artifact_dir), "procon": {"weight": 5}}}
    assert SafeguardCallback(block).engine.config.section("procon").weight == 5.0
    tr = SafeguardSFTTrainer(model=tiny_model(), args=sft_args(tmp_path), processing_class=tok, safeguard=block,
                             train_dataset=Dataset.from_list([{"text": "a b c"}]))
    assert [c.name for c in tr.safeguard.engine.constraints] == ["procon"]
    assert tr.safeguard.engine.constraints[0].config.weight == 5.0
