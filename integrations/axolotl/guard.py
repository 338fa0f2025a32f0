"""Fail an Axolotl run whose YAML has a ``safeguard:`` block that no active plugin will apply.

Why this exists: Axolotl ignores unknown top-level keys, and when a plugin listed under ``plugins:`` fails to
import it logs ``Failed to load plugin`` and trains anyway. A ``safeguard:`` block would then vanish without a
trace and the run would fine-tune *without* the constraints. The check therefore has to run whether or not our
plugin loaded, so it cannot live in the plugin.

Mechanism: a pydantic plugin (entry-point group ``pydantic``; pydantic loads every installed one the first time
a model class is built, in every process, however Axolotl is launched: ``axolotl train``, ``accelerate launch -m
axolotl.cli.train``, ``python -m axolotl.cli.train`` or the Python API). Axolotl always validates the YAML
through pydantic (``axolotl.utils.config.validate_config``); when our plugin is active, the class it validates
with gains a ``safeguard`` field from :class:`~safeguard_plugin.integrations.axolotl.args.SafeguardArgs`. So the
rule is: an Axolotl config class *without* a ``safeguard`` field being fed a non-null ``safeguard`` value means
the plugin is not active -> raise. Every other pydantic model gets no handler, so the cost elsewhere is nil.

Alternatives considered: an ``axolotl.cli_commands`` entry point is only imported by the ``axolotl`` CLI's
parent process for the command actually run (lazily), not by the training child nor by ``accelerate launch``;
a ``.pth``/``sitecustomize`` hook runs in every Python process and is harder to audit. The pydantic hook runs
exactly where Axolotl reads the YAML. It is disabled only by ``PYDANTIC_DISABLE_PLUGINS`` (``1``/``__all__``,
or naming ``safeguard_axolotl_guard``) -- the plugin logs a warning at registration when it is missing.

This module must stay import-light (standard library only): pydantic imports it while building whichever model
class comes first in a process, possibly in the middle of another package's import.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

PLUGIN_PATH = "safeguard_plugin.integrations.axolotl.SafeguardPlugin"
ENTRY_POINT_NAME = "safeguard_axolotl_guard"
_AXOLOTL_CONFIG_MODULE = "axolotl.utils.schemas.config"
_AXOLOTL_CONFIG_CLASSES = ("AxolotlInputConfig", "AxolotlConfigWCapabilities")


class SafeguardNotActiveError(ValueError):
    """A ``safeguard:`` block is present but the Axolotl plugin that applies it is not active."""


def not_active_message(plugins: Any) -> str:
    listed = [str(p) for p in plugins] if isinstance(plugins, (list, tuple)) else []
    if PLUGIN_PATH in listed:
        why = (f"`{PLUGIN_PATH}` is listed under `plugins:` but did not load; look for 'Failed to load plugin' "
               "above (Axolotl logs an import error of a plugin and continues without it)")
    elif any("safeguard" in p for p in listed):
        why = f"`plugins:` lists {[p for p in listed if 'safeguard' in p]}, which is not `{PLUGIN_PATH}` (misspelled?)"
    else:
        why = f"`plugins:` does not list `{PLUGIN_PATH}`"
    return (
        f"safeguard: this Axolotl config has a `safeguard:` block, but the safeguard plugin is not active: {why}. "
        "Without it the block would be ignored and training would run WITHOUT the safety constraints. Fix: add\n"
        f"  plugins:\n    - {PLUGIN_PATH}\n"
        "(and make sure `import safeguard_plugin.integrations.axolotl` works in this environment), or remove the "
        "`safeguard:` block to train without constraints."
    )


def is_axolotl_config_class(cls: Any) -> bool:
    return any(
        getattr(c, "__module__", None) == _AXOLOTL_CONFIG_MODULE and getattr(c, "__name__", None) in _AXOLOTL_CONFIG_CLASSES
        for c in getattr(cls, "__mro__", ())
    )


def check_config(cls: Any, data: Any) -> None:
    """Raise :class:`SafeguardNotActiveError` when ``data`` sets ``safeguard`` but ``cls`` has no such field."""
    if not isinstance(data, Mapping) or data.get("safeguard") is None:
        return
    if "safeguard" in (getattr(cls, "__pydantic_fields__", None) or {}):
        return
    msg = not_active_message(data.get("plugins"))
    logging.getLogger("axolotl.integrations.safeguard").error(msg)
    raise SafeguardNotActiveError(msg)


class _ValidateHandler:
    """pydantic ``on_validate_python`` handler for one Axolotl config class."""

    def __init__(self, cls: Any):
        self.cls = cls

    def on_enter(self, input: Any, **_kwargs: Any) -> None:  # noqa: A002 - pydantic's parameter name
        check_config(self.cls, input)


class SafeguardAxolotlGuard:
    """The pydantic plugin object (``[project.entry-points.pydantic]``)."""

    def new_schema_validator(self, schema, schema_type, schema_type_path, schema_kind, config, plugin_settings):
        if schema_kind in ("BaseModel", "create_model") and is_axolotl_config_class(schema_type):
            return _ValidateHandler(schema_type), None, None
        return None, None, None


guard = SafeguardAxolotlGuard()


def guard_installed() -> bool | None:
    """Whether pydantic loaded this guard in the current process (None: cannot tell on this pydantic)."""
    try:
        from pydantic.plugin import _loader
    except ImportError:
        return None
    plugins = getattr(_loader, "_plugins", None)
    if plugins is None:  # not loaded yet: ask pydantic to load them now
        try:
            plugins = {id(p): p for p in _loader.get_plugins()}
        except Exception:  # pragma: no cover - defensive, pydantic internals
            return None
    return any(isinstance(p, SafeguardAxolotlGuard) for p in dict(plugins).values())
