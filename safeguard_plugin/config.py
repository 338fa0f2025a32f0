"""One configuration schema for every entry point (TRL callback, trainer mixin, Axolotl, CLI).

YAML shape::

    artifact: ./safeguard-artifacts/qwen05   # from `safeguard calibrate`
    procon: {weight: 100.0, warmup_ratio: 0.1}
    # <constraint name>: {...}  -- any registered constraint, its own pydantic config

Each constraint section is validated by that constraint's own ``config_class``; unknown keys at any
level fail with the key's name and the allowed names.
"""

from __future__ import annotations

import numbers
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from .errors import ConfigError  # re-exported: safeguard_plugin.config.ConfigError
from .registry import available_constraints, broken_constraints


def python_form(value: Any) -> Any:
    """What a Python caller may pass where YAML gives a plain value: a tuple for a list, an ``os.PathLike`` for a
    string, a NumPy integer / float for a number; the same value in its plain form (anything else unchanged)."""
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, int)):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, (int, float)):
        return float(value)
    return value


def errors_at(err: ValidationError, *prefix: str | int) -> list[InitErrorDetails]:
    """``err``'s errors moved under ``prefix`` (e.g. a config section's key), to raise several sections' errors as one
    ``ValidationError.from_exception_data(title, errors)``; type, message and input are kept as they are."""
    return [InitErrorDetails(type=PydanticCustomError(e["type"], "{message}", {"message": e["msg"]}),
                             loc=(*prefix, *e["loc"]), input=e["input"]) for e in err.errors()]


_NUMBER_ERRORS = ("float_type", "int_type", "float_parsing", "int_parsing", "int_from_float")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _hint(e: dict) -> str:
    """`` (got ...)``: the offending value, and how to write it, for type errors on plain values."""
    value = e.get("input")
    if not isinstance(value, (str, int, float, bool)) or e["type"] in ("extra_forbidden", "value_error",
                                                                       "safeguard_config"):
        return ""
    got = f" (got {type(value).__name__} {value!r}"
    if e["type"] in _NUMBER_ERRORS and isinstance(value, str) and _is_number(value):
        return got + "; write the number without quotes)"
    if e["type"] in _NUMBER_ERRORS and isinstance(value, bool):
        return got + "; a boolean is not a number)"
    if e["type"] == "bool_type":
        return got + "; write true or false, without quotes)"
    if e["type"] == "finite_number":
        return got + "; use a finite number)"
    return got + ")"


def _format_errors(prefix: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in (prefix, *e["loc"]) if p != "")
        msg = str(e["msg"]).removeprefix("Value error, ") + _hint(e)
        lines.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(lines)


def _error(loc: tuple, value: Any, message: str) -> InitErrorDetails:
    return InitErrorDetails(type=PydanticCustomError("safeguard_config", "{message}", {"message": message}),
                            loc=loc, input=value)


def _unwrap(data: dict, where: str = "") -> Any:
    """The settings of a mapping that holds them under a ``safeguard:`` key (an Axolotl-style YAML/dict), else it."""
    if "safeguard" not in data:
        return data
    inner = data["safeguard"]
    if not isinstance(inner, dict):
        raise ConfigError(f"{where}'safeguard' must be a mapping of safeguard settings (e.g. `procon: {{weight: 100}}`), "
                          f"got {type(inner).__name__}")
    return inner


class SafeguardConfig(BaseModel):
    """Top-level safeguard settings plus one section per enabled constraint."""

    # strict: "1e3" is not a number, "no" is not a boolean (an int is fine for a float field)
    model_config = ConfigDict(extra="allow", validate_assignment=False, strict=True, allow_inf_nan=False)

    artifact: str | None = Field(
        None, description="Calibration artifact folder (manifest.json + safetensors) made by `safeguard calibrate`."
    )
    nan_policy: Literal["skip", "raise"] = Field(
        "skip", description="A non-finite penalty: skip that micro-batch's penalty (warn + count) or raise."
    )
    strict_fingerprint: bool = Field(
        True, description="Refuse an artifact whose model fingerprint differs from the model being trained."
    )
    check_first_steps: int = Field(
        3, ge=1, description="Fail the run if no constraint saw a usable position in this many optimizer steps."
    )
    preset: str | None = Field(
        None, description="A named configuration: `recommended` (see docs/presets.md). Sections written next to it "
                          "are merged over the preset's key by key; `<constraint>: {enabled: false}` drops one."
    )

    @field_validator("artifact", mode="before")
    @classmethod
    def _artifact_path(cls, value: Any) -> Any:
        return python_form(value)  # a pathlib.Path from Python

    @model_validator(mode="wrap")
    @classmethod
    def _validate_all(cls, data: Any, handler: Any) -> SafeguardConfig:
        """Validate the top-level keys and every constraint section, and report every invalid key in one error
        (an error in one place does not hide those in another)."""
        if not isinstance(data, dict):
            return handler(data)
        if "safeguard" in data:  # the same settings under a `safeguard:` key (Axolotl-style mapping)
            try:
                data = _unwrap(data)
            except ConfigError as err:
                raise ValidationError.from_exception_data(cls.__name__, [_error((), data["safeguard"], str(err))]) from None
        if data.get("preset") is not None:
            from .presets import apply_preset

            try:
                data = apply_preset(data)
            except ConfigError as err:
                raise ValidationError.from_exception_data(cls.__name__, [_error(("preset",), data["preset"],
                                                                                 str(err).removeprefix("preset: "))]) from None
        fields = cls.model_fields
        errors: list[InitErrorDetails] = []
        cfg = None
        try:
            cfg = handler({k: v for k, v in data.items() if k in fields})
        except ValidationError as err:
            errors += errors_at(err)
        registry = available_constraints()
        sections: dict[str, Any] = {}
        for key, value in data.items():
            if key in fields:
                continue
            if key in broken_constraints():
                errors.append(_error((), value, f"'{key}' is installed but failed to import: {broken_constraints()[key]}"))
                continue
            if key not in registry:
                allowed = sorted(set(fields) | set(registry))
                errors.append(_error((), value, f"unknown key '{key}'; allowed keys: {', '.join(allowed)}"))
                continue
            cfg_cls = registry[key].config_class
            if isinstance(value, cfg_cls):
                sections[key] = value
                continue
            if value is None or value is True:
                value = {}
            if not isinstance(value, dict):
                errors.append(_error((), value, f"'{key}' must be a mapping of {cfg_cls.__name__} fields, got "
                                                f"{type(value).__name__}"))
                continue
            try:
                sections[key] = cfg_cls.model_validate(value)
            except ValidationError as err:
                errors += errors_at(err, key)
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, errors)
        cfg.__pydantic_extra__.update(sections)
        return cfg

    @classmethod
    def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The schema of the whole configuration with every registered constraint's section typed (sections are
        validated dynamically here, so pydantic's own schema of this class would list only the top-level keys)."""
        return config_model().model_json_schema(*args, **kwargs)

    def constraint_configs(self) -> dict[str, BaseModel]:
        """Enabled constraint sections, by registry name."""
        return {k: v for k, v in (self.__pydantic_extra__ or {}).items() if getattr(v, "enabled", True)}

    def section(self, name: str) -> BaseModel | None:
        return (self.__pydantic_extra__ or {}).get(name)


def config_model() -> type[BaseModel]:
    """The typed model of the whole configuration, built from the registry (``pydantic.create_model``): the top-level
    keys plus one optional section per registered constraint, typed by that constraint's config class. What
    :func:`config_schema` and the generated docs describe; :class:`SafeguardConfig` validates the same fields (and
    reports every invalid key at once)."""
    from pydantic import create_model

    sections: dict[str, Any] = {}
    for name, cls in available_constraints().items():
        doc = (cls.__doc__ or "").strip().splitlines()
        sections[name] = (cls.config_class | None, Field(None, description=doc[0] if doc else f"The {name} constraint."))
    top = {name: (f.annotation, f) for name, f in SafeguardConfig.model_fields.items()}
    return create_model("SafeguardSettings", __config__=ConfigDict(extra="forbid", strict=True), **top, **sections)


def config_schema() -> dict[str, Any]:
    """JSON schema of the configuration (every registered constraint's section), e.g. for an editor's YAML support."""
    return config_model().model_json_schema()


def load_config(source: str | os.PathLike | dict | SafeguardConfig | None = None, **overrides: Any) -> SafeguardConfig:
    """Build a :class:`SafeguardConfig` from a YAML path, a dict or an existing config.

    A YAML file may hold the settings at the top level or under a ``safeguard:`` key (so an Axolotl YAML
    works as-is). Relative ``artifact`` paths are resolved against the YAML file's folder.
    """
    if isinstance(source, SafeguardConfig):
        data = source.model_dump()
        data.update({k: v for k, v in (source.__pydantic_extra__ or {}).items()})
        base_dir = None
    elif source is None:
        data, base_dir = {}, None
    elif isinstance(source, dict):
        data, base_dir = dict(_unwrap(source)), None
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"safeguard config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(loaded).__name__}")
        data = dict(_unwrap(loaded, f"{path}: "))
        base_dir = path.parent
    data.update(overrides)
    if base_dir is not None and data.get("artifact") and not os.path.isabs(str(data["artifact"])):
        candidate = base_dir / str(data["artifact"])
        if candidate.exists() or not Path(str(data["artifact"])).exists():
            data["artifact"] = str(candidate)
    try:
        cfg = SafeguardConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError("invalid safeguard config: " + _format_errors("", err)) from None
    if not cfg.constraint_configs():
        raise ConfigError(
            "safeguard config enables no constraint, so it would not change training; add a section such as "
            f"`procon: {{weight: 100}}` (registered: {', '.join(available_constraints())})"
        )
    return cfg
