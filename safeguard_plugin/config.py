"""One configuration schema for every entry point (TRL callback, trainer mixin, Axolotl, CLI).

YAML shape::

    artifact: ./safeguard-artifacts/qwen05   # from `safeguard calibrate`
    procon: {weight: 100.0, warmup_ratio: 0.1}
    # <constraint name>: {...}  -- any registered constraint, its own pydantic config

Each constraint section is validated by that constraint's own ``config_class``; unknown keys at any
level fail with the key's name and the allowed names.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .registry import available_constraints, broken_constraints


class ConfigError(ValueError):
    """A safeguard configuration that cannot be used; the message names the key."""


def _format_errors(prefix: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in (prefix, *e["loc"]) if p != "")
        lines.append(f"{loc}: {e['msg']}")
    return "; ".join(lines)


class SafeguardConfig(BaseModel):
    """Top-level safeguard settings plus one section per enabled constraint."""

    model_config = ConfigDict(extra="allow", validate_assignment=False)

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

    @model_validator(mode="after")
    def _validate_sections(self) -> SafeguardConfig:
        registry = available_constraints()
        extras = self.__pydantic_extra__ or {}
        for key, value in list(extras.items()):
            if key in broken_constraints():
                raise ValueError(f"'{key}' is installed but failed to import: {broken_constraints()[key]}")
            if key not in registry:
                allowed = sorted(set(type(self).model_fields) | set(registry))
                raise ValueError(f"unknown key '{key}'; allowed keys: {', '.join(allowed)}")
            cfg_cls = registry[key].config_class
            if isinstance(value, cfg_cls):
                continue
            if value is None or value is True:
                value = {}
            if not isinstance(value, dict):
                raise ValueError(f"'{key}' must be a mapping of {cfg_cls.__name__} fields, got {type(value).__name__}")
            try:
                extras[key] = cfg_cls.model_validate(value)
            except ValidationError as err:
                raise ValueError(_format_errors(key, err)) from None
        return self

    def constraint_configs(self) -> dict[str, BaseModel]:
        """Enabled constraint sections, by registry name."""
        return {k: v for k, v in (self.__pydantic_extra__ or {}).items() if getattr(v, "enabled", True)}

    def section(self, name: str) -> BaseModel | None:
        return (self.__pydantic_extra__ or {}).get(name)


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
        data, base_dir = dict(source), None
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
        data = loaded.get("safeguard", loaded) if "safeguard" in loaded else loaded
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: 'safeguard' must be a mapping")
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
