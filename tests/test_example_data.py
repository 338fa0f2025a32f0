"""``safeguard example-data --out DIR``: the ./tiny-model and ./data.jsonl the Axolotl example YAMLs expect."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from safeguard_plugin.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_writes_the_files_the_axolotl_examples_name(tmp_path, capsys):
    out = tmp_path / "ex"
    assert main(["example-data", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"cd {out} && HF_HUB_OFFLINE=1 WANDB_MODE=disabled axolotl train " in printed
    assert ". .venv-axolotl/bin/activate" in printed
    # the example YAMLs' paths, relative to the folder they are run from
    for name in ("axolotl_lora_procon.yaml", "axolotl_lora_guardspace.yaml", "axolotl_full_procon.yaml"):
        cfg = yaml.safe_load((ROOT / "example_yamls" / name).read_text())
        assert (out / cfg["base_model"]).is_dir() and (out / cfg["datasets"][0]["path"]).is_file()
    assert sorted(p.name for p in out.iterdir()) == ["data.jsonl", "tiny-model"]  # nothing else, no temp left

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from safeguard_plugin.testing import tiny_model

    model = AutoModelForCausalLM.from_pretrained(out / "tiny-model", dtype=torch.float32)
    ref = tiny_model()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values(), strict=True))
    tok = AutoTokenizer.from_pretrained(out / "tiny-model")
    rows = [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]
    assert len(rows) == 32 and len({r["messages"][0]["content"] for r in rows}) == 32
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] and r["messages"][1]["content"]
               for r in rows)
    text = tok.apply_chat_template(rows[0]["messages"], tokenize=False)
    assert text.startswith("<|im_start|>user\n") and rows[0]["messages"][1]["content"] in text


def test_refuses_to_overwrite_and_force_replaces_only_its_own(tmp_path, capsys):
    out = tmp_path / "ex"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["example-data", "--out", str(out)]) == 0
    data = (out / "data.jsonl").read_text()
    (out / "data.jsonl").write_text("edited\n")
    capsys.readouterr()
    assert main(["example-data", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"safeguard example-data: error: {out / 'tiny-model'} already exists; remove it, pass --force" in err
    assert (out / "data.jsonl").read_text() == "edited\n"  # nothing written when refused
    assert main(["example-data", "--out", str(out), "--force"]) == 0
    assert (out / "data.jsonl").read_text() == data and (out / "notes.txt").read_text() == "mine"
    # --force never deletes a folder that is not the tiny model's
    (out / "tiny-model" / "train.py").write_text("code")
    capsys.readouterr()
    assert main(["example-data", "--out", str(out), "--force"]) == 2
    assert "is not a model folder written by example-data" in capsys.readouterr().err
    assert (out / "tiny-model" / "train.py").read_text() == "code"
    (tmp_path / "file").write_text("x")
    assert main(["example-data", "--out", str(tmp_path / "file")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
