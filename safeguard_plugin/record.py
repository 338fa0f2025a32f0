"""The safety record that travels with a fine-tuned model: ``safeguard_run.json`` and a model-card section.

* :func:`run_record` -- what a run did for safety, as a JSON-able dict (:data:`RUN_RECORD_SCHEMA`): the constraints and
  their settings, the calibration artifact (path, model fingerprint, sha256 of ``manifest.json``, calibration data
  hashes), the plugin version, what each constraint measured (``Constraint.record()``; the monitor: refusal score and
  projection at start and end, and the curve), skipped-penalty counts, steps and a one-line verdict.
* :func:`write_model_card` -- merges a "Safety fine-tuning" section into ``folder/README.md`` (the Hugging Face model
  card; created when absent), between markers, so a re-save replaces only that section and keeps the user's text;
  adds ``safeguard-plugin`` and the constraint names to the card's YAML ``tags``; writes ``safeguard_run.json`` (and
  ``safeguard_monitor.png``, the curve, when matplotlib is installed) beside it.
* :func:`append_to_card` -- adds or replaces a titled subsection inside that section (e.g. ``safeguard eval
  --write-card``); kept when the section is rewritten.

The integrations call these after every model save (TRL callback and mixin: each ``Trainer._save``; Axolotl:
``post_train``).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
from pathlib import Path
from typing import Any

RUN_FILE = "safeguard_run.json"
CARD_FILE = "README.md"
CURVE_FILE = "safeguard_monitor.png"
SCHEMA_VERSION = 1
TAG = "safeguard-plugin"
SECTION_TITLE = "Safety fine-tuning"

BEGIN = "<!-- safeguard-plugin:begin (generated; edits between these markers are replaced on the next save) -->"
END = "<!-- safeguard-plugin:end -->"
_BEGIN_RE = re.compile(r"<!-- safeguard-plugin:begin[^\n]*?-->")
_SUB_RE = re.compile(r"<!-- safeguard-plugin:sub:(?P<key>[a-z0-9-]+):begin -->\n(?P<body>.*?)"
                     r"<!-- safeguard-plugin:sub:(?P=key):end -->\n?", re.S)

_NUM = {"type": ["number", "null"]}
_SPAN = {"type": "object", "required": ["start", "end"], "properties": {"start": _NUM, "end": _NUM}}

RUN_RECORD_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "safeguard-plugin run record (safeguard_run.json)",
    "type": "object",
    "required": ["schema_version", "safeguard_plugin", "constraints", "artifact", "measurements", "optimizer_steps",
                 "steps", "skipped_penalties", "verdict"],
    "properties": {
        "schema_version": {"type": "integer", "const": SCHEMA_VERSION},
        "safeguard_plugin": {"type": "string"},
        "constraints": {"type": "array", "items": {
            "type": "object", "required": ["name", "settings"],
            "properties": {"name": {"type": "string"}, "settings": {"type": "object"}}}},
        "artifact": {"type": ["object", "null"], "required": ["path", "fingerprint", "model_id", "manifest_sha256",
                                                              "data"],
                     "properties": {"path": {"type": ["string", "null"]}, "fingerprint": {"type": ["string", "null"]},
                                    "model_id": {"type": ["string", "null"]},
                                    "manifest_sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                                    "data": {"type": "object"}}},
        "measurements": {"type": "object", "additionalProperties": {
            "type": "object",
            "properties": {"refusal_score": _SPAN, "projection": _SPAN, "cosine": _SPAN,
                           "curve": {"type": "array", "items": {"type": "object", "required": ["step"],
                                                                "properties": {"step": {"type": "integer"}}}}}}},
        "optimizer_steps": {"type": "integer", "minimum": 0},
        "steps": {"type": "object", "required": ["global_step", "max_steps"],
                  "properties": {"global_step": {"type": "integer", "minimum": 0},
                                 "max_steps": {"type": "integer", "minimum": 0}}},
        "skipped_penalties": {"type": "object", "required": ["nan_skipped", "penalty_evals", "penalty_skipped"],
                              "properties": {"nan_skipped": {"type": "integer", "minimum": 0},
                                             "penalty_evals": {"type": "integer", "minimum": 0},
                                             "penalty_skipped": {"type": "integer", "minimum": 0},
                                             "reference_missing_rows": {"type": "integer", "minimum": 0},
                                             "position_coverage": _NUM}},
        "stop_reason": {"type": ["string", "null"]},
        "verdict": {"type": "string", "minLength": 1},
    },
}


# ------------------------------------------------------------------------------------------------- the record
def _json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as None and tuples as lists (strict JSON; stable bytes)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if hasattr(value, "item"):  # a tensor / NumPy scalar
        return _json_safe(value.item())
    return str(value)


def _artifact_record(artifact: Any) -> dict[str, Any] | None:
    if artifact is None:
        return None
    manifest = artifact.manifest
    path = getattr(artifact, "path", None)
    file = Path(path) / "manifest.json" if path is not None else None
    if file is not None and file.is_file():
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
    else:  # an in-memory artifact: the manifest as canonical JSON
        digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    model = manifest.get("model") or {}
    return {"path": os.fspath(path) if path is not None else None,
            "fingerprint": (model.get("fingerprint") or {}).get("id"), "model_id": model.get("id"),
            "manifest_sha256": digest, "data": _json_safe(manifest.get("data") or {})}


def _score_span(measurements: dict[str, dict]) -> tuple[str, dict] | None:
    for name, rec in measurements.items():
        span = rec.get("refusal_score")
        if isinstance(span, dict) and span.get("start") is not None and span.get("end") is not None:
            return name, span
    return None


def verdict(record: dict[str, Any]) -> str:
    """The record's one-line verdict (from the first measurement with a refusal score at start and end)."""
    found = _score_span(record.get("measurements") or {})
    steps = record.get("optimizer_steps", 0)
    if found is None:
        ran = ", ".join(c["name"] for c in record.get("constraints") or []) or "no constraint"
        return (f"no monitor ran: the refusal score was not measured ({ran} over {steps} optimizer steps); add a "
                "`monitor:` section to measure it during training")
    name, span = found
    start, end = span["start"], span["end"]
    change = end - start
    word = "fell" if change < 0 else "rose" if change > 0 else "did not change"
    by = f" by {abs(change):.3f} log-odds" if change else ""
    line = f"refusal score {word}{by} ({start:.3f} -> {end:.3f}, {name}, {steps} optimizer steps)"
    alerts = (record["measurements"][name] or {}).get("alerts")
    if alerts:
        line += f"; {alerts} alert{'s' if alerts != 1 else ''}"
    return line


def run_record(engine: Any, *, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run record of ``engine`` (a :class:`~safeguard_plugin.engine.SafeguardEngine` after or during training) as
    a JSON-able dict matching :data:`RUN_RECORD_SCHEMA`. ``extra``: integration-specific keys added at the top level
    (Axolotl: ``log_history``, ``adapters``, ...); they never replace the record's own keys."""
    from . import __version__

    constraints = list(getattr(engine, "constraints", None) or [])
    if constraints:
        settings = [(c.name, c.config) for c in constraints]
    else:  # not set up: the enabled sections of the config
        settings = list(engine.config.constraint_configs().items())
    measurements: dict[str, dict] = {}
    for c in constraints:
        rec = c.record()
        if rec:
            measurements[c.name] = _json_safe(rec)
    n_rows = int(getattr(engine, "n_rows", 0) or 0)
    record: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "safeguard_plugin": __version__,
        "constraints": [{"name": name, "settings": _json_safe(cfg.model_dump(mode="json"))} for name, cfg in settings],
        "artifact": _artifact_record(getattr(engine, "artifact", None)),
        "measurements": measurements,
        "optimizer_steps": int(getattr(engine, "optimizer_steps_seen", 0)),
        "steps": {"global_step": int(getattr(engine, "global_step", 0)), "max_steps": int(getattr(engine, "max_steps", 0))},
        "skipped_penalties": {
            "nan_skipped": int(getattr(engine, "nan_skipped", 0)),
            "penalty_evals": int(getattr(engine, "n_penalty_evals", 0)),
            "penalty_skipped": int(getattr(engine, "n_penalty_skipped", 0)),
            "reference_missing_rows": int(getattr(engine, "n_rows_ref_missing", 0)),
            "position_coverage": engine.n_rows_found / n_rows if n_rows else None,
        },
        "stop_reason": getattr(engine, "stop_reason", None) or None,
    }
    record["verdict"] = verdict(record)
    for k, v in (extra or {}).items():
        record.setdefault(k, _json_safe(v))
    return record


def validate_record(record: Any, schema: dict[str, Any] | None = None) -> list[str]:
    """Problems of ``record`` against ``schema`` (default :data:`RUN_RECORD_SCHEMA`); empty when it conforms. A small
    validator for the keywords the schema uses (type, required, properties, additionalProperties, items, const,
    minimum, minLength, pattern), so no jsonschema dependency."""
    schema = RUN_RECORD_SCHEMA if schema is None else schema
    problems: list[str] = []
    kinds = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}

    def is_type(v: Any, t: str) -> bool:
        if t == "integer":
            return isinstance(v, int) and not isinstance(v, bool)
        if t == "number":
            return isinstance(v, (int, float)) and not isinstance(v, bool)
        return isinstance(v, kinds[t])

    def check(v: Any, s: dict, where: str) -> None:
        types = s.get("type")
        if types is not None:
            types = [types] if isinstance(types, str) else types
            if not any(is_type(v, t) for t in types):
                problems.append(f"{where}: {type(v).__name__} is not {' or '.join(types)}")
                return
        if "const" in s and v != s["const"]:
            problems.append(f"{where}: {v!r} != {s['const']!r}")
        if isinstance(v, (int, float)) and not isinstance(v, bool) and "minimum" in s and v < s["minimum"]:
            problems.append(f"{where}: {v} < {s['minimum']}")
        if isinstance(v, str):
            if len(v) < s.get("minLength", 0):
                problems.append(f"{where}: shorter than {s['minLength']}")
            if "pattern" in s and not re.search(s["pattern"], v):
                problems.append(f"{where}: {v!r} does not match {s['pattern']}")
        if isinstance(v, dict):
            for k in s.get("required", []):
                if k not in v:
                    problems.append(f"{where}: missing {k!r}")
            props = s.get("properties", {})
            for k, item in v.items():
                if k in props:
                    check(item, props[k], f"{where}.{k}")
                elif isinstance(s.get("additionalProperties"), dict):
                    check(item, s["additionalProperties"], f"{where}.{k}")
        if isinstance(v, list) and isinstance(s.get("items"), dict):
            for i, item in enumerate(v):
                check(item, s["items"], f"{where}[{i}]")

    check(record, schema, "record")
    return problems


# ---------------------------------------------------------------------------------------------- the model card
def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _settings(settings: dict[str, Any]) -> str:
    parts = []
    for k, v in settings.items():
        if k == "enabled":
            continue
        parts.append(f"{k}={json.dumps(v, sort_keys=True, separators=(',', ':'))}")
    return "`" + _cell(", ".join(parts)) + "`" if parts else "defaults"


_LABELS = {"refusal_score": "refusal score (log-odds, harmful prompts)", "projection": "harmful projection (std units)",
           "cosine": "refusal-direction cosine"}


def render_section(record: dict[str, Any], png: str | None = None) -> str:
    """The "Safety fine-tuning" section's Markdown for ``record`` (without markers or subsections)."""
    lines = [f"## {SECTION_TITLE}", "",
             f"Fine-tuned with [safeguard-plugin](https://pypi.org/project/safeguard-plugin/) "
             f"{record.get('safeguard_plugin', '?')}, which keeps the model's safety alignment during fine-tuning.", "",
             f"**Verdict:** {record.get('verdict', '')}", "",
             "| constraint | settings |", "|---|---|"]
    lines += [f"| `{c['name']}` | {_settings(c.get('settings') or {})} |" for c in record.get("constraints") or []]
    lines.append("")
    art = record.get("artifact")
    if art:
        lines += ["Calibration artifact:", "",
                  f"- path: `{art.get('path')}`",
                  f"- model: `{art.get('model_id')}`, fingerprint `{art.get('fingerprint')}`",
                  f"- manifest.json sha256: `{art.get('manifest_sha256')}`"]
        for name, d in sorted((art.get("data") or {}).items()):
            d = d if isinstance(d, dict) else {"value": d}
            desc = ", ".join(f"{k} {_fmt(v)}" for k, v in d.items() if k != "sha256")
            lines.append(f"- calibration data `{name}`: sha256 `{d.get('sha256')}`" + (f" ({desc})" if desc else ""))
        lines.append("")
    for name, rec in sorted((record.get("measurements") or {}).items()):
        spans = [(k, rec[k]) for k in _LABELS if isinstance(rec.get(k), dict)]
        if not spans:
            continue
        lines += [f"Measured by `{name}` ({rec.get('checks', len(rec.get('curve') or []))} checks, "
                  f"{rec.get('alerts', 0)} alerts):", "",
                  "| measurement | start | end | change |", "|---|---|---|---|"]
        for k, span in spans:
            s, e = span.get("start"), span.get("end")
            change = f"{e - s:+.4f}" if s is not None and e is not None else "n/a"
            lines.append(f"| {_LABELS[k]} | {_fmt(s)} | {_fmt(e)} | {change} |")
        lines.append("")
    if png:
        lines += [f"![safeguard monitor curve]({png})", ""]
    sk = record.get("skipped_penalties") or {}
    lines.append(f"Optimizer steps: {record.get('optimizer_steps', 0)}. Penalties skipped as non-finite: "
                 f"{sk.get('penalty_skipped', 0)} of {sk.get('penalty_evals', 0)} evaluations; rows without a "
                 f"reference value: {sk.get('reference_missing_rows', 0)}.")
    if record.get("stop_reason"):
        lines += ["", f"Training stopped early: {_cell(record['stop_reason'])}"]
    lines += ["", f"The full record is in [`{RUN_FILE}`]({RUN_FILE})."]
    return "\n".join(lines) + "\n"


def _split_front_matter(text: str) -> tuple[str | None, str]:
    """(YAML front matter without its ``---`` fences, the rest); None when the card has none."""
    if text.startswith("---\n") or text.startswith("---\r\n"):
        end = re.search(r"^---[ \t]*\r?\n?", text[4:], re.M)
        if end is not None:
            return text[4: 4 + end.start()], text[4 + end.end():]
    return None, text


def _merge_tags(text: str, tags: list[str]) -> str:
    """``text`` with ``tags`` added to its front matter's ``tags`` (front matter created when absent). The front
    matter is rewritten only when a tag is missing, so a card that has them stays byte-identical."""
    import yaml

    front, body = _split_front_matter(text)
    data: Any = {}
    if front is not None:
        try:
            data = yaml.safe_load(front) or {}
        except yaml.YAMLError:
            data = None
    if not isinstance(data, dict):  # unreadable front matter: leave it alone rather than lose it
        return text
    have = data.get("tags")
    have = [have] if isinstance(have, str) else list(have or [])
    missing = [t for t in tags if t not in have]
    if not missing:
        return text
    data["tags"] = have + missing
    dumped = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    return f"---\n{dumped}---\n" + (body if front is not None else ("\n" + body if body else ""))


def _section_bounds(text: str) -> tuple[int, int] | None:
    begin = _BEGIN_RE.search(text)
    if begin is None:
        return None
    end = text.find(END, begin.end())
    if end < 0:
        return None
    stop = end + len(END)
    if text[stop: stop + 1] == "\n":
        stop += 1
    return begin.start(), stop


def _subsections(section: str) -> list[tuple[str, str]]:
    return [(m["key"], m.group(0).rstrip("\n") + "\n") for m in _SUB_RE.finditer(section)]


def _compose(main: str, subs: list[tuple[str, str]]) -> str:
    parts = [BEGIN, main.rstrip("\n")]
    parts += ["", "\n\n".join(body.rstrip("\n") for _, body in subs)] if subs else []
    return "\n".join(parts) + "\n" + END + "\n"


def _place(text: str, block: str) -> str:
    """``text`` with ``block`` replacing the existing section, or appended after the user's text."""
    bounds = _section_bounds(text)
    if bounds is not None:
        return text[: bounds[0]] + block + text[bounds[1]:]
    if not text:
        return block
    return text.rstrip("\n") + "\n\n" + block


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8") if path.is_file() else ""


def _write_if_changed(path: Path, text: str) -> None:
    if _read(path) != text:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)


def _write_curve(folder: Path, record: dict[str, Any]) -> str | None:
    """``safeguard_monitor.png``: every measurement curve with a refusal score, when matplotlib is importable."""
    curves = [(name, rec["curve"]) for name, rec in sorted((record.get("measurements") or {}).items())
              if isinstance(rec.get("curve"), list) and any("refusal_score" in p for p in rec["curve"])]
    if not curves:
        return None
    try:
        from matplotlib.figure import Figure
    except ImportError:  # decoration only: the data is in safeguard_run.json
        return None
    fig = Figure(figsize=(4.5, 2.6), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    for name, curve in curves:
        pts = [(p["step"], p["refusal_score"]) for p in curve if p.get("refusal_score") is not None]
        ax.plot([s for s, _ in pts], [v for _, v in pts], marker="o", label=f"{name}: refusal score")
        proj = [(p["step"], p["projection"]) for p in curve if p.get("projection") is not None]
        if proj:
            twin = ax.twinx()
            twin.plot([s for s, _ in proj], [v for _, v in proj], color="tab:orange", linestyle="--",
                      label="harmful projection (std)")
            twin.set_ylabel("projection (std)", fontsize=8)
            twin.tick_params(labelsize=7)
    ax.set_xlabel("optimizer step", fontsize=8)
    ax.set_ylabel("refusal score (log-odds)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_title("safeguard monitor", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    path = folder / CURVE_FILE
    if not path.is_file() or path.read_bytes() != buf.getvalue():
        path.write_bytes(buf.getvalue())
    return CURVE_FILE


def write_model_card(folder: str | os.PathLike, record: dict[str, Any], png: bool | None = None, *,
                     run_file: bool = True) -> Path:
    """Write ``record`` to ``folder/safeguard_run.json`` and merge its "Safety fine-tuning" section into
    ``folder/README.md`` (created when absent): only the text between the section's markers is replaced, subsections
    added with :func:`append_to_card` are kept, the user's text is never touched; the front matter's ``tags`` gain
    ``safeguard-plugin`` and the constraint names. ``png``: draw the monitor curve (``safeguard_monitor.png``) when
    matplotlib is installed (None/True) or never (False). ``run_file=False``: the card only (the record's JSON is
    already there). Re-saving the same record leaves every file byte-identical.
    Returns the card's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if run_file:
        _write_if_changed(folder / RUN_FILE, json.dumps(record, indent=2, allow_nan=False) + "\n")
    image = _write_curve(folder, record) if png is not False else None
    card = folder / CARD_FILE
    text = _read(card)
    bounds = _section_bounds(text)
    subs = _subsections(text[bounds[0]: bounds[1]]) if bounds else []
    text = _place(text, _compose(render_section(record, image), subs))
    tags = [TAG] + [c["name"] for c in record.get("constraints") or []]
    _write_if_changed(card, _merge_tags(text, tags))
    return card


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "section"


def append_to_card(folder: str | os.PathLike, title: str, markdown: str) -> Path:
    """Add (or replace, matched by ``title``) a ``### title`` subsection with ``markdown`` inside ``folder/README.md``'s
    "Safety fine-tuning" section (created, with the ``safeguard-plugin`` tag, when absent). Idempotent; later
    :func:`write_model_card` calls keep it. Returns the card's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = _slug(title)
    body = (f"<!-- safeguard-plugin:sub:{key}:begin -->\n### {title.strip()}\n\n{markdown.strip()}\n"
            f"<!-- safeguard-plugin:sub:{key}:end -->\n")
    card = folder / CARD_FILE
    text = _read(card)
    bounds = _section_bounds(text)
    if bounds is None:
        main, subs = f"## {SECTION_TITLE}\n", []
    else:
        section = text[bounds[0]: bounds[1]]
        inner = section[len(_BEGIN_RE.match(section).group(0)): section.rfind(END)]
        first = _SUB_RE.search(inner)
        main = (inner[: first.start()] if first else inner).strip("\n") + "\n"
        subs = _subsections(section)
    subs = [(k, body if k == key else b) for k, b in subs] if any(k == key for k, _ in subs) else [*subs, (key, body)]
    text = _place(text, _compose(main, subs))
    _write_if_changed(card, _merge_tags(text, [TAG]))
    return card


def read_record(folder: str | os.PathLike) -> dict[str, Any] | None:
    """``folder/safeguard_run.json``, or None when absent."""
    path = Path(folder) / RUN_FILE
    return json.loads(path.read_text()) if path.is_file() else None
