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
import os
import sys
from collections.abc import Mapping
from typing import Any

from ...errors import SafeguardError

PLUGIN_PATH = "safeguard_plugin.integrations.axolotl.SafeguardPlugin"
ENTRY_POINT_NAME = "safeguard_axolotl_guard"
_AXOLOTL_CONFIG_MODULE = "axolotl.utils.schemas.config"
_AXOLOTL_CONFIG_CLASSES = ("AxolotlInputConfig", "AxolotlConfigWCapabilities")


class SafeguardNotActiveError(SafeguardError, ValueError):
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


# ------------------------------------------------------------------------------------ telemetry when offline
# Axolotl 0.19's telemetry (axolotl/telemetry/manager.py) is on unless AXOLOTL_DO_NOT_TRACK or DO_NOT_TRACK is "1" or
# "true". It reads them once, when the TelemetryManager singleton is created: at the import of axolotl.cli.config
# (module level), which `load_cfg` then uses to queue a "config-loaded" event *before* it registers the plugins. Its
# PostHog sender cannot reach the network offline and keeps retrying, so the process never exits (after "Model
# successfully saved", or after an error). The plugin's own hooks all come too late; this module is imported by
# pydantic when the first model class of the process is built, and Axolotl's config class is built while
# axolotl.cli.config imports axolotl.utils.config -- before the singleton. So the switch lives here.
OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
TRACK_VARS = ("AXOLOTL_DO_NOT_TRACK", "DO_NOT_TRACK")
TELEMETRY_OFF_LINE = ("  telemetry: Axolotl's telemetry switched off (AXOLOTL_DO_NOT_TRACK=1 set by safeguard-plugin "
                      "because {var}=1: offline its sender retries forever and the run would never exit)")
TELEMETRY_ON_WARNING = (
    "  WARNING: {var}=1 (offline) but Axolotl's telemetry is on ({setting}): offline its sender retries forever, so "
    "this process will hang after 'Model successfully saved' (or after an error). Set AXOLOTL_DO_NOT_TRACK=1.")
telemetry_note: str | None = None  # what offline_telemetry_off found in this process (the plugin's banner shows it)


def _env_true(name: str, values: tuple[str, ...] = ("1", "true", "yes", "on")) -> bool:
    value = os.environ.get(name)
    return value is not None and value.strip().lower() in values


def offline_telemetry_off() -> str | None:
    """Hub offline (``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE``) and no telemetry choice in the environment: set
    ``AXOLOTL_DO_NOT_TRACK=1`` (and switch off a TelemetryManager created before). Offline with telemetry explicitly
    on: leave it, and return the warning. Returns the banner line (None: online, nothing to do). Idempotent."""
    global telemetry_note
    offline = next((v for v in OFFLINE_VARS if _env_true(v)), None)
    if offline is None:
        return None
    if telemetry_note is not None:
        return telemetry_note
    set_by_user = [v for v in TRACK_VARS if os.environ.get(v) is not None]
    if set_by_user:
        if any(_env_true(v, ("1", "true")) for v in TRACK_VARS):  # Axolotl's own test: off, nothing to say
            return None
        telemetry_note = TELEMETRY_ON_WARNING.format(
            var=offline, setting=", ".join(f"{v}={os.environ[v]}" for v in set_by_user))
        return telemetry_note
    os.environ["AXOLOTL_DO_NOT_TRACK"] = "1"  # child processes (accelerate launch, torchrun) inherit it
    manager = getattr(sys.modules.get("axolotl.telemetry.manager"), "TelemetryManager", None)
    instance = getattr(manager, "_instance", None)
    if instance is not None and getattr(instance, "enabled", False):
        instance.enabled = False  # created before this ran; send_event and shutdown check this attribute
    telemetry_note = TELEMETRY_OFF_LINE.format(var=offline)
    return telemetry_note


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
            offline_telemetry_off()  # Axolotl's config class is built before its telemetry starts (see above)
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
