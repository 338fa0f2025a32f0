"""The YAML keys the plugin adds to Axolotl: one nested ``safeguard:`` block, validated by OUR schema.

``safeguard_plugin.config.SafeguardConfig`` is the single schema (TRL callback, CLI and Axolotl share it); this
module only wraps it into the one field Axolotl merges into its config, and turns validation errors into
messages that name the full YAML key (``safeguard.procon.weight: ...``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from safeguard_plugin.config import ConfigError, SafeguardConfig, load_config
from safeguard_plugin.registry import available_constraints

if TYPE_CHECKING:
    from safeguard_plugin.constraints.base import Constraint, TrainingSetup

# Axolotl's fused LoRA kernels compute q/k/v, o and the MLP without calling the LoRA modules' forward, so a constraint
# that acts in that forward (Constraint.requires_unfused_lora) would never run. Axolotl 0.19 switches them on by default
# for `adapter: lora|qlora`, on CPU too.
FUSED_LORA_KERNELS = ("lora_qkv_kernel", "lora_o_kernel", "lora_mlp_kernel")
LORA_ADAPTERS = ("lora", "qlora")

_KEY_PREFIX = re.compile(r"^([A-Za-z_][\w.]*): ")
_UNKNOWN_KEY = re.compile(r"^unknown key '([^']+)'; ")


def plain(obj: Any) -> Any:
    """Axolotl's DictDefault (and nested mappings/lists) -> plain dicts and lists."""
    if isinstance(obj, BaseModel):
        return obj
    if isinstance(obj, Mapping):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def _error_lines(err: ValidationError) -> list[str]:
    lines = []
    for e in err.errors():
        msg = str(e["msg"]).removeprefix("Value error, ")
        loc = ".".join(str(p) for p in e["loc"])
        if loc:
            lines.append(f"safeguard.{loc}: {msg}")
        elif m := _UNKNOWN_KEY.match(msg):
            lines.append(f"safeguard.{m.group(1)}: unknown key; {msg[m.end():]}")
        elif _KEY_PREFIX.match(msg):  # a constraint section's error, already 'procon.weight: ...'
            lines.append(f"safeguard.{msg}")
        else:
            lines.append(f"safeguard: {msg}")
    return lines


def validate_block(value: Any) -> SafeguardConfig:
    """A ``safeguard:`` block (mapping) -> :class:`SafeguardConfig`; ``ValueError`` naming the YAML key otherwise.

    Relative ``artifact`` paths are kept as written: like every other path in an Axolotl YAML they are resolved
    against the working directory of the run.
    """
    if isinstance(value, SafeguardConfig):
        cfg = value
    else:
        if not isinstance(value, Mapping):
            raise ConfigError(f"safeguard: must be a mapping (e.g. `procon: {{weight: 100}}`), got {type(value).__name__}")
        try:
            cfg = SafeguardConfig.model_validate(plain(value))
        except ValidationError as err:
            raise ConfigError("; ".join(_error_lines(err))) from None
    try:
        load_config(cfg)  # the checks beyond the schema (e.g. at least one constraint enabled)
    except ConfigError as err:
        raise ConfigError(f"safeguard: {err}") from None
    registry = available_constraints()
    needs = [n for n in cfg.constraint_configs() if getattr(registry.get(n), "requires", ())]
    if needs and not cfg.artifact:
        raise ConfigError(
            f"safeguard.artifact: required by {', '.join(needs)}; give a folder. If it does not exist yet, the plugin "
            "calibrates the model there at the start of the run (or run `axolotl safeguard calibrate <yaml>`)."
        )
    return cfg


def enabled_constraints(block: Any) -> dict[str, type[Constraint]]:
    """The constraint classes a (raw or validated) ``safeguard:`` block enables, by name; empty for an invalid block
    (reported with the key's name by the field validator) or none."""
    if block is None:
        return {}
    try:
        names = validate_block(plain(block)).constraint_configs()
    except ValueError:
        return {}
    registry = available_constraints()
    return {n: registry[n] for n in names if n in registry}


def constraints_with(block: Any, capability: str) -> list[str]:
    """The enabled constraints of ``block`` that declare ``capability`` (a ``Constraint`` class flag)."""
    return [n for n, cls in enabled_constraints(block).items() if getattr(cls, capability, False)]


def _keys(names: list[str]) -> str:
    return ", ".join(f"safeguard.{n}" for n in names)


def fused_kernel_conflicts(cfg: Mapping) -> list[str]:
    """The fused-kernel keys an Axolotl config sets to true."""
    return [k for k in FUSED_LORA_KERNELS if cfg.get(k)]


def kernels_message(keys: list[str], names: list[str]) -> str:
    return (f"{_keys(names)}: Axolotl's fused LoRA kernels ({', '.join(keys)}) bypass the LoRA modules' forward, which "
            f"{', '.join(names)} acts in, so it would not apply; set " + ", ".join(f"`{k}: false`" for k in keys)
            + " (or leave them unset: the plugin then switches them off)")


def adapter_message(names: list[str], adapter: Any) -> str:
    return (f"{_keys(names)}: needs `adapter: lora` (or `qlora`) under Axolotl, got adapter: {adapter!r}. "
            f"{', '.join(names)} trains the run's LoRA adapters (rank `lora_r`, `lora_alpha`); without `adapter:` "
            "Axolotl creates none and saves the whole model as a full fine-tune, which is not what was trained.")


def training_setup(cfg: Mapping) -> TrainingSetup:
    """An Axolotl config's set-up as ``Constraint.check_training`` sees it."""
    from safeguard_plugin.constraints.base import TrainingSetup

    return TrainingSetup(adapter=cfg.get("adapter") or None, packing=bool(cfg.get("sample_packing")),
                         framework="axolotl")


class SafeguardArgs(BaseModel):
    """Input args for the safeguard plugin (``plugins: [safeguard_plugin.integrations.axolotl.SafeguardPlugin]``)."""

    safeguard: SafeguardConfig | None = Field(
        default=None,
        json_schema_extra={
            "description": "Safety constraints applied during fine-tuning (safeguard-plugin). Same schema as "
            "`safeguard_plugin.SafeguardConfig`: `artifact:` plus one section per constraint, e.g. "
            "`procon: {weight: 100}`."
        },
    )

    @model_validator(mode="before")
    @classmethod
    def _constraint_axolotl_settings(cls, data: Any) -> Any:
        """What the enabled constraints declare they need from the run (``Constraint`` capability flags), then each
        one's ``check_training`` on the Axolotl settings:

        * ``requires_lora_adapter``: ``adapter: lora|qlora``.
        * ``requires_unfused_lora``: Axolotl's fused LoRA kernels off. Runs on Axolotl's whole config (this class is
          merged into it), after Axolotl's own auto-enabling of the kernels: values still true here are switched off
          with a warning. The plugin's ``register`` hook (which sees the YAML before validation) has already refused
          kernels the YAML sets to true explicitly.
        """
        if not isinstance(data, Mapping):
            return data
        enabled = enabled_constraints(data.get("safeguard"))
        if not enabled:
            return data
        needs_lora = [n for n, c in enabled.items() if c.requires_lora_adapter]
        if needs_lora and data.get("adapter") not in LORA_ADAPTERS:
            raise ConfigError(adapter_message(needs_lora, data.get("adapter")))
        unfused = [n for n, c in enabled.items() if c.requires_unfused_lora]
        on = fused_kernel_conflicts(data) if unfused else []
        if on:
            import logging

            logging.getLogger("axolotl.integrations.safeguard").warning(
                "safeguard: %s: switching off %s (fused LoRA kernels bypass the LoRA forward, which %s acts in)",
                ", ".join(unfused), ", ".join(on), ", ".join(unfused))
            data = dict(data)
            data.update({k: False for k in on})
        sections = validate_block(plain(data["safeguard"])).constraint_configs()
        setup = training_setup(data)
        for name, constraint in enabled.items():
            constraint.check_training(sections[name], setup)
        return data

    @field_validator("safeguard", mode="before")
    @classmethod
    def _validate_safeguard(cls, value: Any) -> Any:
        if value is None:
            return None
        return validate_block(value)
