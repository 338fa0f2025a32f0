"""The configuration reference, generated from the config classes' field descriptions (issue 15, item 4).

Every table of settings in the README and under ``docs/`` sits between markers::

    <!-- config-table: procon -->            (a constraint section, by registry name; "top" = the top-level keys)
    | key | type | default | meaning |
    ...
    <!-- /config-table -->

``python -m safeguard_plugin.config_docs`` rewrites them; ``--check`` exits 1 naming the stale files (a test runs
it, so a field added or changed without regenerating the docs fails CI). ``--schema`` prints the JSON schema of the
whole configuration (:func:`safeguard_plugin.config.config_schema`), for editors and other tools.
"""

from __future__ import annotations

import argparse
import enum
import json
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from .errors import ConfigError

MARKER = re.compile(r"(<!-- config-table: (?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /config-table -->)", re.S)
ROOT = Path(__file__).resolve().parent.parent


def _type(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation)]
    if origin is typing.Annotated:
        return _type(args[0])
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join("none" if a is type(None) else _type(a) for a in args)
    if origin in (list, tuple, set):
        return f"list of {_type(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " \\| ".join(f"`{m.value}`" for m in annotation)
    return getattr(annotation, "__name__", str(annotation))


def _default(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "see below"
    if value is None:
        return "–"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{json.dumps(value) if isinstance(value, (list, dict)) else value}`"


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        if name == "enabled" and prefix:
            continue  # every section has it; documented once in the top-level table's text
        key = f"{prefix}{name}"
        desc = (field.description or "").replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `{key}` | {_type(field.annotation)} | {_default(field)} | {desc} |")
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):  # a nested block, e.g. calibration:
            rows += _rows(ann, f"{key}.")
    return rows


def config_table(name: str) -> str:
    """The markdown table of ``name``: ``top`` (top-level keys) or a registered constraint's section."""
    from .config import SafeguardConfig
    from .registry import available_constraints

    if name == "top":
        model, prefix = SafeguardConfig, ""
    else:
        registry = available_constraints()
        if name not in registry:
            raise ConfigError(f"config-table: no constraint '{name}' (registered: {', '.join(registry)})")
        model, prefix = registry[name].config_class, f"{name}."
    return "\n".join(["| key | type | default | meaning |", "|---|---|---|---|", *_rows(model, prefix)]) + "\n"


def render(text: str) -> str:
    return MARKER.sub(lambda m: m.group(1) + config_table(m.group("name")) + m.group(4), text)


def doc_files(root: Path = ROOT) -> list[Path]:
    return [p for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))] if p.is_file()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m safeguard_plugin.config_docs", description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only report stale files (exit 1 if any)")
    ap.add_argument("--schema", action="store_true", help="print the configuration's JSON schema and exit")
    args = ap.parse_args(argv)
    if args.schema:
        from .config import config_schema

        print(json.dumps(config_schema(), indent=2))
        return 0
    stale = []
    for path in doc_files():
        text = path.read_text()
        new = render(text)
        if new != text:
            stale.append(str(path.relative_to(ROOT)))
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        print(f"config tables out of date in {', '.join(stale)}: run `python -m safeguard_plugin.config_docs`",
              file=sys.stderr)
        return 1
    print(("rewrote " + ", ".join(stale)) if stale and not args.check else "config tables up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
