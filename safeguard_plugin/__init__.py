"""safeguard-plugin: keep safety alignment intact while fine-tuning.

Data flows one way: ``calibrate`` -> :class:`Artifact` -> constraint -> loss term / after-step edit -> metrics.

Public names are imported lazily, so that ``import safeguard_plugin`` (done by the Axolotl config guard in
every process that builds a pydantic model) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Artifact": ".artifacts",
    "ArtifactError": ".artifacts",
    "SafeguardConfig": ".config",
    "load_config": ".config",
    "Constraint": ".constraints.base",
    "ConstraintConfig": ".constraints.base",
    "SafeguardEngine": ".engine",
    "available_constraints": ".registry",
    "get_constraint": ".registry",
    "register_constraint": ".registry",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'safeguard_plugin' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
