"""The run record (safeguard_run.json) and the model card's "Safety fine-tuning" section: TRL callback and mixin runs,
merging into an existing card, byte-identical re-saves, YAML tags, the schema."""

from __future__ import annotations

import copy
import json
from importlib.util import find_spec

import pytest
import yaml

from safeguard_plugin.record import (
    BEGIN,
    CURVE_FILE,
    END,
    RUN_FILE,
    RUN_RECORD_SCHEMA,
    append_to_card,
    validate_record,
    write_model_card,
)

from helpers import train

USER_CARD = """---
license: apache-2.0
tags:
- trl
- sft
---

# My fine-tuned model

Hand-written text that must survive every save.
"""


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def snapshot(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def check_schema(record: dict) -> None:
    assert validate_record(record) == []
    if find_spec("jsonschema"):  # not a dependency; checked when installed
        import jsonschema

        jsonschema.validate(record, RUN_RECORD_SCHEMA)


def test_callback_run_with_monitor_writes_card_and_record(artifact_dir, tok, chat_rows, tmp_path):
    cfg = {"artifact": str(artifact_dir), "procon": {"weight": 100.0},
           "monitor": {"every_n_steps": 2, "n_prompts": 8, "min_cosine": None, "max_score_drop": 100.0}}
    tr, _ = train("callback", chat_rows, tok, tmp_path / "run", cfg, lora=True)
    out = tmp_path / "saved"
    tr.save_model(str(out))
    text = (out / "README.md").read_text()
    record = json.loads((out / RUN_FILE).read_text())
    check_schema(record)
    assert [c["name"] for c in record["constraints"]] == ["procon", "monitor"]
    assert record["constraints"][0]["settings"]["weight"] == 100.0
    assert record["optimizer_steps"] == 4 and record["steps"]["global_step"] == 4
    art = json.loads((artifact_dir / "manifest.json").read_text())
    assert record["artifact"]["fingerprint"] == art["model"]["fingerprint"]["id"]
    assert record["artifact"]["data"] == art["data"] and set(art["data"]) == {"harmful", "harmless"}
    mon = record["measurements"]["monitor"]
    assert [p["step"] for p in mon["curve"]] == [0, 2, 4]
    assert mon["refusal_score"]["start"] == mon["curve"][0]["refusal_score"]
    assert mon["refusal_score"]["end"] == mon["curve"][-1]["refusal_score"]
    assert mon["projection_drift"] == pytest.approx(mon["projection"]["end"] - mon["projection"]["start"])
    assert record["verdict"].startswith("refusal score ") and "log-odds" in record["verdict"] or \
        "did not change" in record["verdict"]
    assert record["skipped_penalties"]["nan_skipped"] == 0
    # the card: PEFT's own README (adapter card) kept, the section merged, tags added
    assert text.count(BEGIN) == 1 and text.count(END) == 1 and "## Safety fine-tuning" in text
    assert record["verdict"] in text and record["artifact"]["manifest_sha256"] in text
    assert art["data"]["harmful"]["sha256"] in text and "| `procon` |" in text and "refusal score (log-odds" in text
    tags = front_matter(text)["tags"]
    assert {"safeguard-plugin", "procon", "monitor"} <= set(tags)
    if find_spec("matplotlib"):
        assert (out / CURVE_FILE).read_bytes().startswith(b"\x89PNG") and f"]({CURVE_FILE})" in text
    # re-saving the same model: every file byte-identical
    before = snapshot(out)
    tr.save_model(str(out))
    assert snapshot(out) == before


def test_mixin_run_merges_into_existing_card(artifact_dir, tok, chat_rows, tmp_path):
    out = tmp_path / "saved"
    out.mkdir()
    (out / "README.md").write_text(USER_CARD)
    tr, _ = train("mixin", chat_rows, tok, tmp_path / "run", {"artifact": str(artifact_dir), "procon": {"weight": 10.0}})
    tr.save_model(str(out))
    text = (out / "README.md").read_text()
    assert "# My fine-tuned model\n\nHand-written text that must survive every save.\n" in text
    assert text.index("Hand-written text") < text.index(BEGIN)
    meta = front_matter(text)
    assert meta["license"] == "apache-2.0" and meta["tags"] == ["trl", "sft", "safeguard-plugin", "procon"]
    record = json.loads((out / RUN_FILE).read_text())
    check_schema(record)
    assert record["measurements"] == {} and record["verdict"].startswith("no monitor ran")
    assert record["verdict"] in text and not (out / CURVE_FILE).exists()
    before = snapshot(out)
    tr.save_model(str(out))
    assert snapshot(out) == before
    # the user edits their text after a save: kept on the next save, the section still replaced in place
    (out / "README.md").write_text(text.replace("Hand-written text", "Edited text"))
    tr.save_model(str(out))
    again = (out / "README.md").read_text()
    assert "Edited text that must survive" in again and again.count(BEGIN) == 1
    assert again == text.replace("Hand-written text", "Edited text")


def _record(**over) -> dict:
    rec = {"schema_version": 1, "safeguard_plugin": "0.1.0",
           "constraints": [{"name": "procon", "settings": {"enabled": True, "weight": 1.0}}],
           "artifact": {"path": "/a", "fingerprint": "abc", "model_id": "tiny", "manifest_sha256": "0" * 64,
                        "data": {"harmful": {"sha256": "f" * 64, "n_train": 3}}},
           "measurements": {"monitor": {"refusal_score": {"start": 2.0, "end": 1.5}, "projection": {"start": 1.0, "end": 0.5},
                                        "curve": [{"step": 0, "refusal_score": 2.0}, {"step": 4, "refusal_score": 1.5}]}},
           "optimizer_steps": 4, "steps": {"global_step": 4, "max_steps": 4},
           "skipped_penalties": {"nan_skipped": 0, "penalty_evals": 16, "penalty_skipped": 0},
           "stop_reason": None, "verdict": "refusal score fell by 0.500 log-odds"}
    rec.update(over)
    return rec


def test_schema_validator_catches_problems():
    assert validate_record(_record()) == []
    bad = copy.deepcopy(_record())
    del bad["verdict"]
    bad["optimizer_steps"] = -1
    bad["artifact"]["manifest_sha256"] = "xyz"
    bad["measurements"]["monitor"]["refusal_score"] = {"start": "high", "end": 1.0}
    problems = validate_record(bad)
    assert any("missing 'verdict'" in p for p in problems)
    assert any("optimizer_steps: -1 < 0" in p for p in problems)
    assert any("manifest_sha256" in p for p in problems)
    assert any("refusal_score.start" in p for p in problems)
    assert validate_record([]) == ["record: list is not object"]


def test_append_to_card_is_idempotent_and_survives_rewrites(tmp_path):
    (tmp_path / "README.md").write_text("# Model\n\nuser text\n")
    append_to_card(tmp_path, "Safety evaluation", "| set | refusal |\n|---|---|\n| harmful | 0.97 |")
    first = (tmp_path / "README.md").read_text()
    assert "### Safety evaluation" in first and "## Safety fine-tuning" in first and "user text" in first
    assert front_matter(first)["tags"] == ["safeguard-plugin"]
    append_to_card(tmp_path, "Safety evaluation", "| set | refusal |\n|---|---|\n| harmful | 0.97 |")
    assert (tmp_path / "README.md").read_text() == first
    # the run's section written afterwards keeps the subsection; a re-save is byte-identical
    write_model_card(tmp_path, _record(), png=False)
    card = (tmp_path / "README.md").read_text()
    assert card.count("### Safety evaluation") == 1 and "refusal score fell by 0.500" in card
    assert card.index("refusal score fell") < card.index("### Safety evaluation") < card.index(END)
    write_model_card(tmp_path, _record(), png=False)
    assert (tmp_path / "README.md").read_text() == card
    # replacing the subsection (matched by title) and adding another
    append_to_card(tmp_path, "Safety evaluation", "retention 0.91")
    append_to_card(tmp_path, "Notes", "second")
    card = (tmp_path / "README.md").read_text()
    assert card.count("### Safety evaluation") == 1 and "retention 0.91" in card and "0.97" not in card
    assert card.index("### Safety evaluation") < card.index("### Notes") < card.index(END)
    assert "user text" in card and card.count(BEGIN) == 1
    # a new record replaces the main text only
    write_model_card(tmp_path, _record(verdict="refusal score rose by 0.100 log-odds"), png=False)
    card = (tmp_path / "README.md").read_text()
    assert "rose by 0.100" in card and "fell by 0.500" not in card and "retention 0.91" in card and "### Notes" in card


def test_card_created_when_absent(tmp_path):
    folder = tmp_path / "new"
    write_model_card(folder, _record(), png=False)
    text = (folder / "README.md").read_text()
    assert front_matter(text)["tags"] == ["safeguard-plugin", "procon"]
    assert text.split("---\n", 2)[2].lstrip("\n").startswith(BEGIN)
    assert json.loads((folder / RUN_FILE).read_text()) == _record()


def test_axolotl_post_train_writes_record_and_card(tmp_path):
    """The Axolotl plugin's post_train (a stand-in engine): the same record format, the card in output_dir, merged
    again on the second call (after Axolotl's own save)."""
    from types import SimpleNamespace

    pytest.importorskip("axolotl")
    from axolotl.utils.dict import DictDefault

    from safeguard_plugin.config import load_config
    from safeguard_plugin.integrations.axolotl.plugin import SafeguardPlugin

    class Engine:
        config = load_config({"artifact": "a", "procon": {}})
        artifact, constraints, stop_reason, model = None, [], None, "trained model"
        optimizer_steps_seen, n_rows, n_rows_found, nan_skipped = 3, 4, 4, 0

        def banner(self):
            return "safeguard active: test"

        def detach(self):
            self.model = None

    trainer = SimpleNamespace(state=SimpleNamespace(log_history=[{"loss": 1.0, "safeguard/penalty": 0.5, "step": 1}]),
                              is_world_process_zero=lambda: True)
    plugin = SafeguardPlugin()
    plugin.callback = SimpleNamespace(engine=Engine(), trainer=trainer, save_adapters=lambda d: [])
    cfg = DictDefault({"output_dir": str(tmp_path)})
    plugin.post_train(cfg, model=None)
    record = json.loads((tmp_path / RUN_FILE).read_text())
    check_schema(record)
    assert record["optimizer_steps"] == 3 and record["log_history"][0]["step"] == 1
    assert record["verdict"].startswith("no monitor ran")
    (tmp_path / "README.md").write_text(USER_CARD)  # Axolotl's own save writes a card between the two calls
    plugin.post_train(cfg, model=None)
    text = (tmp_path / "README.md").read_text()
    assert "Hand-written text" in text and record["verdict"] in text and text.count(BEGIN) == 1
    assert front_matter(text)["tags"] == ["trl", "sft", "safeguard-plugin", "procon"]
