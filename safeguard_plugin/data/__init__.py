"""Prompt sets and safety-data helpers.

Shipped sets (own wording, ``safeguard_plugin/data/*.jsonl``): ``harmful`` (208, 16 categories),
``harmless`` (204, 12 categories), ``borderline`` (88 safe-but-risky-looking prompts), each split
train / heldout; ``refusals`` (refusal responses) and ``compliance`` (content-free compliance-style
templates used only by the benchmark's attack data).
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

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


def _prompt_of(row: dict[str, Any], where: str) -> str:
    for k in _PROMPT_KEYS:
        if isinstance(row.get(k), str) and row[k].strip():
            return row[k].strip()
    raise ValueError(f"{where}: no prompt column (looked for {', '.join(_PROMPT_KEYS)})")


def load_prompts(spec: str, limit: int | None = None, heldout_frac: float = 0.3, seed: int = 0) -> PromptSet:
    """A prompt set from a shipped name (``harmful``/``harmless``/``borderline``), a JSONL/JSON/CSV file, or an
    HF dataset id (``name``, ``name:config``, optionally ``@split``; needs the hub or a local HF cache).

    Rows with a ``split`` field of ``train``/``heldout`` keep it; otherwise a seeded split is made.
    """
    rows: list[dict[str, Any]]
    if spec in ("harmful", "harmless", "borderline"):
        rows = read_jsonl(spec)
    elif Path(spec).is_file():
        p = Path(spec)
        if p.suffix == ".csv":
            with p.open(newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        elif p.suffix == ".json":
            data = json.loads(p.read_text(encoding="utf-8"))
            rows = data if isinstance(data, list) else data.get("data", [])
            rows = [r if isinstance(r, dict) else {"prompt": r} for r in rows]
        else:
            rows = [json.loads(x) for x in p.read_text(encoding="utf-8").splitlines() if x.strip()]
            rows = [r if isinstance(r, dict) else {"prompt": r} for r in rows]
    else:
        from datasets import load_dataset

        name, _, split = spec.partition("@")
        path, _, cfg = name.partition(":")
        try:
            ds = load_dataset(path, cfg or None, split=split or "train")
        except Exception as err:  # noqa: BLE001 - re-raised with the fix
            raise ValueError(f"cannot load prompts '{spec}': not a shipped set, not a file, and the HF dataset "
                             f"could not be loaded ({type(err).__name__}: {err})") from None
        rows = [dict(r) for r in ds]
    prompts = [_prompt_of(r, spec) for r in rows]
    if limit:
        prompts, rows = prompts[:limit], rows[:limit]
    if rows and all(r.get("split") in ("train", "heldout") for r in rows):
        train = [p for p, r in zip(prompts, rows) if r["split"] == "train"]
        heldout = [p for p, r in zip(prompts, rows) if r["split"] == "heldout"]
    else:
        train, heldout = _split(prompts, heldout_frac, seed)
    if not train or not heldout:
        raise ValueError(f"prompt set '{spec}' needs at least 2 prompts (got {len(prompts)})")
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
            raise ValueError("fmt must be 'messages' or 'prompt_completion'")
    rng.shuffle(out)
    return out


def mix_safety_data(dataset, ratio: float = 0.1, seed: int = 0):
    """Return ``dataset`` with harmful-prompt -> refusal examples mixed in, so that they make up ``ratio``
    of the result. Works on a ``datasets.Dataset`` or a list of dicts in TRL's conversational formats
    (``messages`` or ``prompt``/``completion``); the result has the same type and columns.
    """
    if not 0 <= ratio < 1:
        raise ValueError("ratio must be in [0, 1)")
    rows = list(dataset) if not isinstance(dataset, list) else dataset
    if not rows:
        raise ValueError("mix_safety_data: empty dataset")
    cols = set(rows[0])
    if "messages" in cols:
        fmt = "messages"
    elif {"prompt", "completion"} <= cols and isinstance(rows[0]["prompt"], list):
        fmt = "prompt_completion"
    else:
        raise ValueError("mix_safety_data supports conversational datasets ('messages' or 'prompt'/'completion' "
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
