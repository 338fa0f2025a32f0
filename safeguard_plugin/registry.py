"""Name -> class registries filled from entry-point groups.

Constraints come from ``safeguard_plugin.constraints`` (built-ins are registered exactly like third-party ones,
see ``pyproject.toml``, so there is a single code path); risk estimators from
``safeguard_plugin.risk_estimators``. ``register_constraint`` exists for code that cannot ship an entry point
(notebooks, tests). An entry point that fails to import is reported by name when asked for, never dropped
silently, and does not take the others down.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, SafeguardRuntimeError

if TYPE_CHECKING:
    from .constraints.base import Constraint

ENTRY_POINT_GROUP = "safeguard_plugin.constraints"
logger = logging.getLogger("safeguard_plugin")


class EntryPointRegistry:
    """Classes registered under an entry-point group, keyed by their ``name`` attribute."""

    def __init__(self, group: str, base: Callable[[], type], kind: str,
                 on_empty: Callable[[], dict[str, type]] | None = None):
        self.group, self._base, self.kind, self._on_empty = group, base, kind, on_empty
        self._registry: dict[str, type] = {}
        self._manual: dict[str, type] = {}
        self._broken: dict[str, str] = {}
        self._loaded = False

    def check(self, name: str, cls: object, origin: str) -> type:
        base = self._base()
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise TypeError(f"{origin}: '{name}' must point to a {base.__module__}.{base.__name__} subclass, got {cls!r}")
        if getattr(cls, "name", None) != name:
            raise TypeError(f"{origin}: entry point name '{name}' differs from "
                            f"{cls.__name__}.name={getattr(cls, 'name', None)!r}")
        return cls

    def _load(self) -> None:
        if self._loaded:
            return
        found: dict[str, type] = {}
        self._broken.clear()
        for ep in entry_points(group=self.group):
            if ep.name in found:
                continue  # the same distribution seen twice on sys.path (editable + site-packages)
            try:
                obj = ep.load()
            except Exception as err:  # noqa: BLE001 - reported when the class is asked for
                self._broken[ep.name] = f"{ep.value}: {type(err).__name__}: {err}"
                logger.warning("safeguard: %s entry point '%s' failed to import (%s)", self.kind, ep.name,
                               self._broken[ep.name])
                continue
            found[ep.name] = self.check(ep.name, obj, f"entry point {ep.value}")
        if self._on_empty is not None:
            found = found or self._on_empty()
        self._registry = {**found, **self._manual}
        self._loaded = True

    def reload(self) -> None:
        """Re-read the entry points (after installing a plugin package in a running process)."""
        self._loaded = False
        self._load()

    def register(self, cls: type) -> type:
        self.check(getattr(cls, "name", "?"), cls, f"register {self.kind}")
        self._manual[cls.name] = cls
        self._registry[cls.name] = cls
        return cls

    def available(self) -> dict[str, type]:
        self._load()
        return dict(sorted(self._registry.items()))

    def broken(self) -> dict[str, str]:
        self._load()
        return dict(self._broken)

    def get(self, name: str) -> type:
        self._load()
        try:
            return self._registry[name]
        except KeyError:
            if name in self._broken:
                raise ImportError(f"{self.kind} '{name}' is installed but failed to import: {self._broken[name]}") from None
            raise ConfigError(f"unknown {self.kind} '{name}'; registered: {', '.join(sorted(self._registry)) or 'none'}") from None


def _constraint_base() -> type:
    from .constraints.base import Constraint

    return Constraint


def _missing_metadata() -> dict[str, Any]:
    raise SafeguardRuntimeError(
        "safeguard_plugin's built-in constraints are not registered: the package metadata is missing. "
        "Install the package (`pip install -e .` in a checkout, or `pip install safeguard-plugin`)."
    )


constraints = EntryPointRegistry(ENTRY_POINT_GROUP, _constraint_base, "constraint", on_empty=_missing_metadata)


def reload() -> None:
    constraints.reload()


def register_constraint(cls: type[Constraint]) -> type[Constraint]:
    """Register a constraint class by its ``name`` (usable as a class decorator)."""
    return constraints.register(cls)


def available_constraints() -> dict[str, type[Constraint]]:
    return constraints.available()


def broken_constraints() -> dict[str, str]:
    """Entry points that failed to import (name -> error)."""
    return constraints.broken()


def get_constraint(name: str) -> type[Constraint]:
    return constraints.get(name)
