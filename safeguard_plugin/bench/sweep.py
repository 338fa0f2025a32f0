"""Strength sweeps for ``safeguard bench --sweep procon.weight=1,10,100,1000``.

A spec is ``<constraint>.<dotted config key>=<v1>,<v2>,...``; values are parsed as int, float, bool (true/false),
null, a list in brackets (``[harmful,harmless,contrast]``: its commas do not separate values) or else string. Several
specs on one constraint are crossed (every combination). Each point is the constraint's first benchmark row (its
``bench.py``) with the swept keys set, validated by the configuration schema before any model loads, and becomes a
method row labelled ``procon[weight=10]``.

A preset is swept the same way, its key naming the section first: ``recommended.anchor.weight=1,3,10`` gives rows
``recommended[anchor.weight=1]``, ... (the whole preset with that one key changed).
"""

from __future__ import annotations

import copy
import itertools
import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from ..errors import ConfigError


@dataclass(frozen=True)
class SweepSpec:
    constraint: str
    key: str  # dotted, inside the constraint's section
    values: tuple[Any, ...]


@dataclass(frozen=True)
class SweepPoint:
    label: str  # "procon[weight=10]"
    constraint: str
    params: dict[str, Any]  # {dotted key: value}
    config: dict[str, dict]  # {constraint: section}, as a bench method's config


def split_values(text: str) -> list[str]:
    """``text`` split at the commas outside brackets: ``"1,[a,b],2"`` -> ``["1", "[a,b]", "2"]``."""
    out, depth, cur = [], 0, []
    for ch in text:
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth < 0:
            raise ConfigError(f"--sweep values {text!r}: ']' without its '['")
        if ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise ConfigError(f"--sweep values {text!r}: '[' without its ']'")
    out.append("".join(cur))
    return out


def parse_value(text: str) -> Any:
    """``"10"`` -> 10, ``"1e3"`` / ``"0.5"`` -> float, ``"true"``/``"false"`` -> bool, ``"null"``/``"none"`` -> None,
    ``"[a,b]"`` -> a list of such values, anything else -> the string (stripped)."""
    t = text.strip()
    if t.startswith("[") and t.endswith("]"):
        return [parse_value(v) for v in split_values(t[1:-1]) if v.strip()]
    low = t.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("null", "none"):
        return None
    for conv in (int, float):
        try:
            return conv(t)
        except ValueError:
            pass
    return t


def _fields(model: type[BaseModel]) -> dict[str, Any]:
    return dict(model.model_fields)


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation (``Sub``, ``Sub | None``), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _nested_model(arg)
        if found is not None:
            return found
    return None


def check_key(constraint: str, key: str, spec: str | None = None) -> None:
    """Raise :class:`ConfigError` unless ``key`` (dotted) names a field of ``constraint``'s config (naming the valid
    keys at the level where it fails). For a preset, ``key`` is ``<section>.<key>`` of one of its constraints.
    ``spec``: the name shown in the message (default ``<constraint>.<key>``)."""
    from ..presets import PRESETS
    from ..registry import available_constraints

    registry = available_constraints()
    spec = spec or f"{constraint}.{key}"
    if constraint in PRESETS:
        section, dot, rest = key.partition(".")
        if not dot or not rest or section not in registry:
            raise ConfigError(f"--sweep {spec}: a preset's key names a constraint section first, e.g. "
                              f"{constraint}.anchor.weight; registered constraints: {', '.join(sorted(registry))}")
        check_key(section, rest, spec)
        return
    if constraint not in registry:
        raise ConfigError(f"--sweep {spec}: unknown constraint {constraint!r}; registered: "
                          f"{', '.join(sorted(registry))}")
    model: type[BaseModel] | None = registry[constraint].config_class
    where = constraint
    for part in key.split("."):
        fields = _fields(model) if model is not None else {}
        if part not in fields:
            valid = ", ".join(sorted(f for f in fields if f != "enabled")) or "(none: not a section)"
            raise ConfigError(f"--sweep {spec}: {where} has no key {part!r}; valid keys: {valid}")
        model = _nested_model(fields[part].annotation)
        where = f"{where}.{part}"


def parse_sweep(specs: list[str] | tuple[str, ...] | None) -> list[SweepSpec]:
    """``["procon.weight=1,10"]`` -> specs, each key checked against the config schema (:func:`check_key`)."""
    out: list[SweepSpec] = []
    for spec in specs or ():
        name, eq, values = spec.partition("=")
        constraint, dot, key = name.strip().partition(".")
        if not eq or not dot or not constraint or not key or not values.strip():
            raise ConfigError(f"--sweep {spec!r}: expected <constraint>.<key>=<v1>,<v2>,... "
                              "(e.g. procon.weight=1,10,100,1000)")
        parsed = tuple(parse_value(v) for v in split_values(values) if v.strip())
        if not parsed:
            raise ConfigError(f"--sweep {spec!r}: no values")
        check_key(constraint, key)
        if any(s.constraint == constraint and s.key == key for s in out):
            raise ConfigError(f"--sweep {constraint}.{key} given twice")
        unique: dict[str, Any] = {}  # repeated values dropped, in order (lists are not hashable: keyed by JSON)
        for v in parsed:
            unique.setdefault(json.dumps(v), v)
        out.append(SweepSpec(constraint, key, tuple(unique.values())))
    return out


def _set(section: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        sub = section.get(p)
        section[p] = sub = dict(sub) if isinstance(sub, dict) else {}
        section = sub
    section[parts[-1]] = value


def _fmt(v: Any) -> str:
    if isinstance(v, list):
        return "[" + ",".join(_fmt(x) for x in v) + "]"
    return v if isinstance(v, str) else json.dumps(v)


def sweep_points(specs: list[SweepSpec], base_rows: dict[str, dict] | None = None) -> list[SweepPoint]:
    """The method rows of ``specs``: per constraint, every combination of its swept values on top of its first bench
    row (``base_rows[constraint]``; default from its ``bench.py``), each validated as a whole safeguard config
    (``SafeguardConfig``: types, ranges, cross-field rules); an invalid point is a :class:`ConfigError` naming it."""
    from pydantic import ValidationError

    from ..config import SafeguardConfig, _format_errors
    from ..presets import PRESETS
    from ..registry import available_constraints
    from .runner import method_bench

    by: dict[str, list[SweepSpec]] = {}
    for s in specs:
        by.setdefault(s.constraint, []).append(s)
    points: list[SweepPoint] = []
    for constraint, group in by.items():
        preset = constraint in PRESETS  # the whole preset ({section: settings}), its keys "<section>.<key>"
        if preset:
            base = PRESETS[constraint]
        elif base_rows is not None and constraint in base_rows:
            base = base_rows[constraint]
        else:
            rows = method_bench(available_constraints()[constraint]).rows
            base = next(iter(rows.values())) if rows else {}
        for combo in itertools.product(*(s.values for s in group)):
            params = {s.key: v for s, v in zip(group, combo)}
            section = copy.deepcopy(base)
            for k, v in params.items():
                _set(section, k, v)
            config = section if preset else {constraint: section}
            label = f"{constraint}[{','.join(f'{k}={_fmt(v)}' for k, v in params.items())}]"
            try:
                SafeguardConfig.model_validate(config)
            except ValidationError as err:
                raise ConfigError(f"--sweep point {label} is not a valid config: {_format_errors('', err)}") from None
            points.append(SweepPoint(label, constraint, params, config))
    return points
