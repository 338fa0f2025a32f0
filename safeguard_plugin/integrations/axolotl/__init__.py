"""Axolotl integration for safeguard-plugin (layout as Axolotl's own ``axolotl/integrations/<name>/``).

YAML::

    plugins:
      - safeguard_plugin.integrations.axolotl.SafeguardPlugin
    safeguard:
      artifact: ./safeguard-artifacts/my-model   # calibrated here at the start of the run if missing
      procon: {weight: 100.0}

``SafeguardPlugin`` (``plugin.py``) and ``SafeguardArgs`` (``args.py``) are exported lazily: pydantic imports
``guard.py`` of this package while building the first model class of any process (see ``guard.py``), possibly
in the middle of Axolotl's own imports, so this ``__init__`` must not import Axolotl (or torch) itself.
Axolotl resolves ``...axolotl.SafeguardPlugin`` with ``getattr`` on this module, which the lazy export serves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .args import SafeguardArgs
    from .calibrate import calibrate_from_axolotl_config
    from .plugin import SafeguardPlugin

__all__ = ["SafeguardPlugin", "SafeguardArgs", "calibrate_from_axolotl_config"]

_LAZY = {
    "SafeguardPlugin": ".plugin",
    "SafeguardArgs": ".args",
    "calibrate_from_axolotl_config": ".calibrate",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
