"""Name -> constraint class, filled from the ``safeguard_plugin.constraints`` entry-point group.

Built-in constraints are registered exactly like third-party ones (see ``pyproject.toml``), so the
registry has a single code path. ``register_constraint`` exists for code that cannot ship an entry
point (notebooks, tests).
"""

from __future__ import annotations

import logging
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .constraints.base import Constraint

ENTRY_POINT_GROUP = "safeguard_plugin.constraints"
logger = logging.getLogger("safeguard_plugin")

_registry: dict[str, type[Constraint]] = {}
_manual: dict[str, type[Constraint]] = {}
_broken: dict[str, str] = {}  # entry points that failed to import: name -> error
_loaded = False


def _check(name: str, cls: object, origin: str) -> type[Constraint]:
    from .constraints.base import Constraint

    if not (isinstance(cls, type) and issubclass(cls, Constraint)):
        raise TypeError(f"{origin}: '{name}' must point to a safeguard_plugin.Constraint subclass, got {cls!r}")
    if getattr(cls, "name", None) != name:
        raise TypeError(f"{origin}: entry point name '{name}' differs from {cls.__name__}.name={cls.name!r}")
    return cls


def _load() -> None:
    global _loaded
    if _loaded:
        return
    found: dict[str, type[Constraint]] = {}
    _broken.clear()
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in found:
            continue  # the same distribution seen twice on sys.path (editable + site-packages)
        try:
            obj = ep.load()
        except Exception as err:  # noqa: BLE001 - reported when the constraint is asked for
            _broken[ep.name] = f"{ep.value}: {type(err).__name__}: {err}"
            logger.warning("safeguard: constraint entry point '%s' failed to import (%s)", ep.name, _broken[ep.name])
            continue
        found[ep.name] = _check(ep.name, obj, f"entry point {ep.value}")
    if "procon" not in found:
        raise RuntimeError(
            "safeguard_plugin's built-in constraints are not registered: the package metadata is missing. "
            "Install the package (`pip install -e .` in a checkout, or `pip install safeguard-plugin`)."
        )
    _registry.clear()
    _registry.update(found)
    _registry.update(_manual)
    _loaded = True


def broken_constraints() -> dict[str, str]:
    """Entry points that failed to import (name -> error)."""
    _load()
    return dict(_broken)


def reload() -> None:
    """Re-read the entry points (after installing a plugin package in a running process)."""
    global _loaded
    _loaded = False
    _load()


def register_constraint(cls: type[Constraint]) -> type[Constraint]:
    """Register a constraint class by its ``name`` (usable as a class decorator)."""
    _check(getattr(cls, "name", "?"), cls, "register_constraint")
    _manual[cls.name] = cls
    _registry[cls.name] = cls
    return cls


def available_constraints() -> dict[str, type[Constraint]]:
    _load()
    return dict(sorted(_registry.items()))


def get_constraint(name: str) -> type[Constraint]:
    _load()
    try:
        return _registry[name]
    except KeyError:
        if name in _broken:
            raise ImportError(f"constraint '{name}' is installed but failed to import: {_broken[name]}") from None
        raise KeyError(
            f"unknown constraint '{name}'; registered: {', '.join(sorted(_registry)) or 'none'}"
        ) from None
