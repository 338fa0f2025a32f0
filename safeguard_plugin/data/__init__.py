"""Prompt sets and safety-data helpers.

Shipped sets (own wording, ``safeguard_plugin/data/*.jsonl``): ``harmful`` (208, 16 categories),
``harmless`` (204, 12 categories), ``borderline`` (88 safe-but-risky-looking prompts), each split
train / heldout; ``refusals`` (refusal responses) and ``compliance`` (content-free compliance-style
templates used only by the benchmark's attack data).
"""

from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import DataError

_PROMPT_KEYS = ("prompt", "instruction", "goal", "behavior", "Behavior", "question", "text")


@dataclass
class PromptSet:
    train: list[str]
    heldout: list[str]
    source: str

    @property
    def all(self) -> list[str]:
        return self.train + self.heldout


def read_jsonl(name: str) -> list[dict[str, Any]]:
    text = resources.files(__name__).joinpath(f"{name}.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _split(prompts: list[str], heldout_frac: float, seed: int) -> tuple[list[str], list[str]]:
    idx = list(range(len(prompts)))
    random.Random(seed).shuffle(idx)
    n_ho = max(1, int(round(len(prompts) * heldout_frac))) if len(prompts) > 1 else 0
    ho = set(idx[:n_ho])
    return [p for i, p in enumerate(prompts) if i not in ho], [p for i, p in enumerate(prompts) if i in ho]


def _prompt_of(row: Any, where: str) -> str:
    if isinstance(row, str) and row.strip():
        return row.strip()
    if isinstance(row, dict):
        for k in _PROMPT_KEYS:
            if isinstance(row.get(k), str) and row[k].strip():
                return row[k].strip()
        raise DataError(f"{where}: no prompt column (looked for {', '.join(_PROMPT_KEYS)}; the row has "
                         f"{', '.join(map(str, row)) or 'no columns'})")
    raise DataError(f"{where}: expected a JSON object with a prompt column (such as {{\"prompt\": \"...\"}}) "
                     f"or a non-empty string, got {type(row).__name__} {str(row)[:60]!r}")


# contrast: safe prompts that look unsafe (homonyms, figures of speech, safe targets and contexts, definitions,
# history, public figures, safety questions), written apart from borderline and xstest_style (disjoint, checked in
# tests) so that an anchor can hold the base model's answers on them without touching an evaluation set
SHIPPED_SETS = ("harmful", "harmless", "borderline", "contrast")
_FILE_SUFFIXES = (".jsonl", ".json", ".csv")


def is_prompt_file(spec: str) -> bool:
    """Whether ``spec`` names a prompt file (an existing file, or a path ending in .jsonl/.json/.csv) rather than a
    shipped set name or an HF dataset id."""
    return spec not in SHIPPED_SETS and (Path(spec).is_file() or Path(spec).suffix.lower() in _FILE_SUFFIXES)


def prompt_set_names(specs: list[str], flag: str = "--prompts") -> dict[str, str]:
    """``{name: spec}`` with unique names for a list of prompt-set specs: a shipped set keeps its name, an HF dataset
    id is its own name, a file is named by its file name without the extension (``data/mine.jsonl`` -> ``mine``)
    unless another set would get the same name, in which case it is named by the path as given
    (``harmful harmful.jsonl`` -> ``harmful`` and ``harmful.jsonl``). The same set given twice is refused."""
    def identity(spec: str) -> str:
        return str(Path(spec).resolve()) if is_prompt_file(spec) and Path(spec).is_file() else spec

    seen: dict[str, str] = {}
    for spec in specs:
        if identity(spec) in seen:
            same = seen[identity(spec)]
            raise DataError(f"{flag}: {spec!r} is given twice" + (f" (as {same!r} and {spec!r})" if same != spec else "")
                             + "; list each prompt set once")
        seen[identity(spec)] = spec
    first = {s: Path(s).stem if is_prompt_file(s) else s for s in specs}
    counts: dict[str, int] = {}
    for n in first.values():
        counts[n] = counts.get(n, 0) + 1
    names: dict[str, str] = {}
    for spec in specs:
        name = first[spec] if counts[first[spec]] == 1 else spec
        if name in names:
            raise DataError(f"{flag}: {names[name]!r} and {spec!r} would both be reported as {name!r}; rename one "
                             "of the files")
        names[name] = spec
    return names


def _read_text(path: Path) -> str:
    """The file decoded as UTF-8 (a BOM is dropped); a decoding error names the file and the 1-based line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        start = err.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
        line = data[:start].count(b"\n") + 1
        col = start - (data.rfind(b"\n", 0, start) + 1) + 1
        raise DataError(f"{path} line {line}: not UTF-8 (byte 0x{data[start]:02x} at column {col}); save the "
                         "file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 in > out`)") from None


def _file_prompts(p: Path) -> list[tuple[str, dict[str, Any]]]:
    """``[(prompt, row)]`` of a JSONL/JSON/CSV file; every error names the file and the 1-based line."""
    text = _read_text(p)
    out: list[tuple[str, dict[str, Any]]] = []
    if p.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            for row in reader:
                out.append((_prompt_of(row, f"{p} line {reader.line_num}"), row))
        except csv.Error as err:
            raise DataError(f"{p} line {reader.line_num}: not valid CSV ({err})") from None
        return out
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{p} line {err.lineno}: not valid JSON ({err.msg}, column {err.colno})") from None
        rows = data if isinstance(data, list) else data.get("data", []) if isinstance(data, dict) else None
        if not isinstance(rows, list):
            raise DataError(f"{p}: expected a JSON list of prompts (or {{\"data\": [...]}}), got {type(data).__name__}")
        for i, r in enumerate(rows):
            out.append((_prompt_of(r, f"{p} item {i + 1}"), r if isinstance(r, dict) else {}))
        return out
    # JSONL: lines are counted the way editors count them (only "\n" ends a line; JSON strings may hold U+2028)
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{p} line {n}: not valid JSON ({err.msg}, column {err.colno}); each line must be one "
                             "JSON object such as {\"prompt\": \"...\"}") from None
        out.append((_prompt_of(r, f"{p} line {n}"), r if isinstance(r, dict) else {}))
    return out


def load_prompts(spec: str, limit: int | None = None, heldout_frac: float = 0.3, seed: int = 0,
                 need_split: bool = True) -> PromptSet:
    """A prompt set from a shipped name (``harmful``/``harmless``/``borderline``), a JSONL/JSON/CSV file, or an
    HF dataset id (``name``, ``name:config``, optionally ``@split``; needs the hub or a local HF cache).

    Rows with a ``split`` field of ``train``/``heldout`` keep it; otherwise a seeded split is made. With
    ``need_split=False`` (the caller evaluates ``.all``) a set of one prompt is accepted. File errors name the file
    and the 1-based line.
    """
    rows: list[dict[str, Any]]
    if spec in SHIPPED_SETS:
        rows = read_jsonl(spec)
        prompts = [_prompt_of(r, spec) for r in rows]
    elif is_prompt_file(spec):
        p = Path(spec)
        if not p.is_file():
            raise DataError(f"prompt file {spec} not found" + (" (it is a folder)" if p.is_dir() else "")
                             + "; give an existing .jsonl/.json/.csv file, a shipped set name "
                             f"({', '.join(SHIPPED_SETS)}) or an HF dataset id")
        pairs = _file_prompts(p)
        prompts, rows = [x for x, _ in pairs], [r for _, r in pairs]
    else:
        from datasets import load_dataset

        name, _, split = spec.partition("@")
        path, _, cfg = name.partition(":")
        try:
            ds = load_dataset(path, cfg or None, split=split or "train")
        except Exception as err:  # noqa: BLE001 - re-raised with the fix
            raise DataError(f"cannot load prompts '{spec}': not a shipped set, not a file, and the HF dataset "
                             f"could not be loaded ({type(err).__name__}: {err})") from None
        rows = [dict(r) for r in ds]
        prompts = [_prompt_of(r, f"{spec} row {i + 1}") for i, r in enumerate(rows)]
    if limit:
        prompts, rows = prompts[:limit], rows[:limit]
    if not prompts:
        raise DataError(f"prompt set '{spec}' has no prompts")
    if rows and all(r.get("split") in ("train", "heldout") for r in rows):
        train = [p for p, r in zip(prompts, rows) if r["split"] == "train"]
        heldout = [p for p, r in zip(prompts, rows) if r["split"] == "heldout"]
    else:
        train, heldout = _split(prompts, heldout_frac, seed)
    if need_split and (not train or not heldout):
        raise DataError(f"prompt set '{spec}' needs prompts in both its train and heldout splits (got "
                         f"{len(train)} train, {len(heldout)} heldout): give at least 2 prompts, and if rows have a "
                         "'split' field, both values")
    return PromptSet(train, heldout, spec)


def refusal_texts() -> list[str]:
    return [r["text"].replace("{topic}", "that") for r in read_jsonl("refusals")]


def safety_examples(n: int, seed: int = 0, fmt: str = "messages", split: str = "train") -> list[dict[str, Any]]:
    """``n`` harmful-prompt -> refusal examples (ProCon's "safety-data broadening")."""
    rng = random.Random(seed)
    prompts = [r["prompt"] for r in read_jsonl("harmful") if r["split"] == split]
    refusals = refusal_texts()
    out = []
    for i in range(n):
        p, r = prompts[i % len(prompts)], rng.choice(refusals)
        if fmt == "messages":
            out.append({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}]})
        elif fmt == "prompt_completion":
            out.append({"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": r}]})
        else:
            raise DataError("fmt must be 'messages' or 'prompt_completion'")
    rng.shuffle(out)
    return out


def mix_safety_data(dataset, ratio: float = 0.1, seed: int = 0):
    """Return ``dataset`` with harmful-prompt -> refusal examples mixed in, so that they make up ``ratio``
    of the result. Works on a ``datasets.Dataset`` or a list of dicts in TRL's conversational formats
    (``messages`` or ``prompt``/``completion``); the result has the same type and columns.
    """
    if not 0 <= ratio < 1:
        raise DataError("ratio must be in [0, 1)")
    rows = list(dataset) if not isinstance(dataset, list) else dataset
    if not rows:
        raise DataError("mix_safety_data: empty dataset")
    cols = set(rows[0])
    if "messages" in cols:
        fmt = "messages"
    elif {"prompt", "completion"} <= cols and isinstance(rows[0]["prompt"], list):
        fmt = "prompt_completion"
    else:
        raise DataError("mix_safety_data supports conversational datasets ('messages' or 'prompt'/'completion' "
                         f"lists of role/content dicts); got columns {sorted(cols)}")
    n = int(round(ratio * len(rows) / (1 - ratio)))
    extra = safety_examples(n, seed=seed, fmt=fmt)
    for e in extra:  # keep other columns present (empty) so Dataset.from_list sees one schema
        for c in cols - set(e):
            e[c] = None
    mixed = rows + extra
    random.Random(seed).shuffle(mixed)
    if isinstance(dataset, list):
        return mixed
    from datasets import Dataset

    return Dataset.from_list(mixed)
