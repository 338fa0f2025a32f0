"""``safeguard example-data --out DIR``: the ``./tiny-model`` and ``./data.jsonl`` the Axolotl example YAMLs expect.

* ``tiny-model/``: the random 4-layer Qwen2 with the ChatML byte-level tokenizer of :mod:`safeguard_plugin.testing`
  (built here, nothing downloaded), saved with ``save_pretrained``; the same model the tests train.
* ``data.jsonl``: benign chat data, one ``{"messages": [user, assistant]}`` per line: the shipped arithmetic word
  problems (:func:`safeguard_plugin.bench.datasets.arithmetic_task`, train split) with their worked answers.

Only these two paths inside ``DIR`` are written; an existing one is refused (``--force`` replaces them, and replaces
``tiny-model/`` only when it holds nothing but a model's files).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import SafeguardError

MODEL_DIR = "tiny-model"
DATA_FILE = "data.jsonl"
N_EXAMPLES = 32
# what save_pretrained writes for the tiny model and its tokenizer (the names vary a little by transformers version)
_MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json"}


class ExampleDataError(SafeguardError, ValueError):
    """``--out`` already holds something example-data would replace."""


def chat_examples(n: int = N_EXAMPLES, seed: int = 0) -> list[dict]:
    """``n`` benign ``{"messages": [...]}`` rows (arithmetic word problems and their worked answers)."""
    from .bench.datasets import arithmetic_task

    return [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]}
            for r in arithmetic_task(n, seed=seed, split="train")]


def _check_target(path: Path, force: bool) -> None:
    if not os.path.lexists(path):
        return
    if not force:
        raise ExampleDataError(f"{path} already exists; remove it, pass --force to replace it, or choose another --out")
    if path.name == DATA_FILE:
        if path.is_symlink() or not path.is_file():
            raise ExampleDataError(f"{path} exists and is not a regular file; not replacing it (even with --force)")
        return
    foreign = sorted(p.name for p in path.iterdir()) if path.is_dir() and not path.is_symlink() else None
    if foreign is None or not (set(foreign) <= _MODEL_FILES and "config.json" in foreign):
        raise ExampleDataError(f"{path} exists and is not a model folder written by example-data "
                               f"(holds {foreign if foreign is not None else 'a file or link'}); not replacing it "
                               "(even with --force): remove it yourself or choose another --out")


def write_example_data(out: str | os.PathLike, force: bool = False, n: int = N_EXAMPLES) -> tuple[Path, Path]:
    """Write ``out/tiny-model/`` and ``out/data.jsonl``. Returns both paths.

    Each is written to a temporary name in ``out`` and renamed into place, so an interrupted call leaves no
    half-written model or data file under the final names.
    """
    from .testing import tiny_model, tiny_tokenizer

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExampleDataError(f"--out {out} is a file, not a folder")
    model_dir, data_file = out / MODEL_DIR, out / DATA_FILE
    for p in (model_dir, data_file):
        _check_target(p, force)
    out.mkdir(parents=True, exist_ok=True)

    tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIR}.tmp-", dir=out))
    try:
        tiny_model().save_pretrained(tmp)
        tiny_tokenizer().save_pretrained(tmp)
        if model_dir.exists():  # --force, checked above: a model folder of ours
            shutil.rmtree(model_dir)
        os.replace(tmp, model_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

    fd, tmp_data = tempfile.mkstemp(prefix=f".{DATA_FILE}.tmp-", dir=out)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in chat_examples(n))
        os.replace(tmp_data, data_file)
    finally:
        if os.path.exists(tmp_data):
            os.unlink(tmp_data)
    return model_dir, data_file


def next_steps(out: str | os.PathLike, n: int = N_EXAMPLES) -> str:
    """What to run next (printed by the command)."""
    from pathlib import PurePath

    yaml = Path(__file__).resolve().parents[1] / "example_yamls" / "axolotl_lora_procon.yaml"
    where = str(yaml) if yaml.is_file() else "example_yamls/axolotl_lora_procon.yaml (from the safeguard-plugin repo)"
    return (f"wrote {PurePath(out) / MODEL_DIR}/ (random 4-layer Qwen2, ChatML tokenizer) and "
            f"{PurePath(out) / DATA_FILE} ({n} chat examples)\n"
            "next, in the Axolotl environment (`. .venv-axolotl/bin/activate`; paths in the YAML are relative to the "
            "folder you run from):\n"
            f"  cd {out} && HF_HUB_OFFLINE=1 WANDB_MODE=disabled axolotl train {where}")
