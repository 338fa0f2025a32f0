"""Named configurations: ``preset: <name>`` in a safeguard config (TRL, the trainer mixin, Axolotl, the CLI).

A preset is a set of constraint sections. The user's own sections are merged over it key by key (nested mappings
too), so ``preset: recommended`` with ``procon: {weight: 10}`` changes one key, and ``procon: {enabled: false}``
switches that constraint off. How each preset was chosen, and what it measured, is in docs/presets.md.
"""

from __future__ import annotations

import copy
from typing import Any

from .errors import ConfigError

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # see docs/presets.md for the measurements behind it
    "recommended": {
        "procon": {"weight": 100.0, "warmup_ratio": 0.1, "warmup_factor": 10.0},
        "adaptive_kl": {"risk": "probe", "weight_bounds": [0.0, 1.0]},
        "anchor": {"weight": 3.0, "pool_size": 288},
    },
}


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged into a copy of ``base``: mappings key by key (recursively), anything else replaced."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_preset(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (a safeguard config mapping) with its ``preset`` expanded: the preset's sections, the user's sections
    merged over them. Unchanged when ``preset`` is absent or None."""
    name = data.get("preset")
    if name is None:
        return data
    if not isinstance(name, str) or name not in PRESETS:
        raise ConfigError(f"preset: unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}")
    out = dict(data)
    for section, settings in PRESETS[name].items():
        mine = out.get(section)
        if mine is None or mine is True:
            out[section] = copy.deepcopy(settings)
        elif isinstance(mine, dict):
            out[section] = merge(settings, mine)
        # anything else: left for the section's own validation to refuse
    return out


__all__ = ["PRESETS", "apply_preset", "merge"]
