"""Issue 15, item 4: calibration-only options live under each section's ``calibration:`` block.

The nested form works; the old flat form still works (moved under ``calibration:`` with a FutureWarning naming the
new key); a key given both ways is an error; ``safeguard calibrate --config`` reads the nested options.
"""

from __future__ import annotations

import json
import warnings

import pytest
from pydantic import Field

from safeguard_plugin.cli import main
from safeguard_plugin.config import ConfigError, load_config
from safeguard_plugin.constraints.base import CalibrationOptions, Constraint, ConstraintConfig
from safeguard_plugin.constraints.cwac import CWACConfig
from safeguard_plugin.constraints.guardspace import GuardSpaceConfig

CASES = [  # (section, calibration-only options) for each method that has them
    ("cwac", {"energy": 0.5, "max_rank": 4, "max_prompts": 9, "sketch_size": 40, "sae_layer": 1, "sae_path": "sae",
              "sae_expansion": 2, "sae_k": 8, "sae_steps": 7, "sae_n_features": 5}),
    ("guardspace", {"max_prompts": 9, "calibration_rank": 4, "max_covariance_gb": 0.5}),
]


def test_calibration_only_options_are_nested_not_flat():
    for cls, moved, kept in [
        (CWACConfig, CASES[0][1], {"rank", "sides", "target_modules"}),
        (GuardSpaceConfig, CASES[1][1], {"null_energy", "damping", "massive_share", "min_null_dim"}),
    ]:
        assert not set(moved) & set(cls.model_fields)  # gone from the top of the section ...
        assert set(moved) == set(cls.model_fields["calibration"].annotation.model_fields)  # ... and all under it
        assert kept <= set(cls.model_fields)  # what training reads (or checks against the artifact) stays on top
        assert isinstance(cls().calibration, CalibrationOptions)


@pytest.mark.parametrize("name, options", CASES)
def test_nested_form_works_without_warning(name, options):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        section = load_config({"artifact": "a", name: {"calibration": options}}).section(name)
    assert section.calibration.model_dump() == {**section.calibration.model_dump(), **options}


@pytest.mark.parametrize("name, options", CASES)
def test_flat_form_warns_and_lands_in_the_same_place(name, options):
    nested = load_config({"artifact": "a", name: {"calibration": options}}).section(name)
    with pytest.warns(FutureWarning) as record:
        flat = load_config({"artifact": "a", name: dict(options)}).section(name)
    assert flat == nested
    messages = {str(w.message).split(" (")[0] for w in record if issubclass(w.category, FutureWarning)}
    assert messages == {f"{name}.{k} is now {name}.calibration.{k}" for k in options}


def test_flat_form_from_yaml_and_mixed_with_nested(tmp_path):
    p = tmp_path / "safeguard.yaml"
    p.write_text("safeguard:\n  cwac:\n    sae_steps: 20\n    calibration: {max_rank: 4}\n")
    with pytest.warns(FutureWarning, match=r"cwac\.sae_steps is now cwac\.calibration\.sae_steps"):
        cw = load_config(p).section("cwac")
    assert (cw.calibration.sae_steps, cw.calibration.max_rank) == (20, 4)
    with pytest.warns(FutureWarning, match=r"cwac\.max_rank is now cwac\.calibration\.max_rank"):  # from Python too
        assert CWACConfig(max_rank=3).calibration.max_rank == 3


@pytest.mark.parametrize("data, pattern", [
    ({"cwac": {"energy": 0.5, "calibration": {"energy": 0.6}}},
     r"cwac: energy is given both as cwac\.energy and as cwac\.calibration\.energy: keep only "
     r"cwac\.calibration\.energy"),
    ({"guardspace": {"calibration_rank": 8, "max_prompts": 4, "calibration": {"calibration_rank": 16}}},
     r"guardspace: calibration_rank is given both as guardspace\.calibration_rank and as "
     r"guardspace\.calibration\.calibration_rank"),
])
def test_both_forms_at_once_is_an_error(data, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config({"artifact": "a", **data})


@pytest.mark.parametrize("data, pattern", [
    ({"cwac": {"calibration": {"energy": 2}}}, r"cwac\.calibration\.energy: Input should be less than or equal to 1"),
    ({"cwac": {"calibration": {"energy": "0.5"}}}, r"cwac\.calibration\.energy: Input should be a valid number"),
    ({"cwac": {"calibration": {"rank": 4}}}, r"cwac\.calibration\.rank: Extra inputs are not permitted"),
    ({"guardspace": {"calibration": {"max_covariance_gb": float("inf")}}},
     r"guardspace\.calibration\.max_covariance_gb: Input should be a finite number"),
    ({"guardspace": {"calibration": 3}}, r"guardspace\.calibration: Input should be a valid dictionary"),
    ({"guardspace": {"energy": 0.5}}, r"guardspace\.energy: Extra inputs are not permitted"),  # not a flat alias here
])
def test_the_calibration_block_is_as_strict_as_the_section(data, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config({"artifact": "a", **data})


def test_a_new_method_gets_the_flat_key_migration_for_free():
    class _Cal(CalibrationOptions):
        samples: int = Field(10, ge=1, description="Calibration samples.")

    class _Cfg(ConstraintConfig):
        weight: float = Field(1.0, description="λ.")
        calibration: _Cal = Field(default_factory=_Cal, description="Calibration-only options.")

    class _Method(Constraint):  # noqa: F841  (defining it names the config's section)
        name = "toy_method"
        config_class = _Cfg

    with pytest.warns(FutureWarning, match=r"toy_method\.samples is now toy_method\.calibration\.samples"):
        assert _Cfg.model_validate({"samples": 3}).calibration.samples == 3
    with pytest.raises(ValueError, match="samples is given both as toy_method.samples"):
        _Cfg.model_validate({"samples": 3, "calibration": {"samples": 4}})


@pytest.mark.parametrize("flat", [False, True])
def test_safeguard_calibrate_reads_the_nested_options(tmp_path, flat):
    options = {"calibration_rank": 3, "max_prompts": 6}
    section = {"target_modules": ["q_proj"], **(options if flat else {"calibration": options})}
    cfg = tmp_path / "safeguard.yaml"
    cfg.write_text(json.dumps({"guardspace": section}))  # JSON is YAML
    out = tmp_path / "art"
    args = ["calibrate", "--model", "tiny", "--out", str(out), "--limit", "16", "--batch-size", "8",
            "--config", str(cfg)]
    if flat:
        with pytest.warns(FutureWarning) as record:
            assert main(args) == 0
        assert {str(w.message).split(" (")[0] for w in record} == {
            f"guardspace.{k} is now guardspace.calibration.{k}" for k in options}
    else:
        assert main(args) == 0
    meta = json.loads((out / "manifest.json").read_text())["components"]["guardspace"]
    assert meta["calibration_rank"] == 3 and meta["n_prompts"] == 6
