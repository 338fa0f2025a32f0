"""Safety monitor: config validation, metrics in the log, stop / restore / warn on degradation, lenient runs."""

import logging
import warnings

import pytest
import torch

from safeguard_plugin.config import ConfigError, load_config
from safeguard_plugin.constraints.monitor import Measurement, SafetyMonitor
from safeguard_plugin.integrations.trl import SafeguardCallback
from safeguard_plugin.testing import tiny_model

from helpers import max_diff, sft_args, train

# any weight change moves the harmful projection by more than this: the first check after a big update alerts
STRICT = {"min_cosine": None, "max_score_drop": None, "max_projection_shift": 1e-4}
LENIENT = {"min_cosine": -1.0, "max_score_drop": 1e9, "max_projection_shift": 1e9}
DEGRADE = {"learning_rate": 5e-2, "max_steps": 6}


def cfg(artifact_dir, procon=None, **monitor):
    out = {"artifact": str(artifact_dir), "monitor": {"every_n_steps": 1, "n_prompts": 16, **monitor}}
    if procon is not None:
        out["procon"] = procon
    return out


def engine_of(trainer):
    (cb,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, SafeguardCallback)]
    return cb.engine


def logs_of(trainer):
    return [h for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize(
    "section, pattern",
    [
        ({"every_n_steps": 0}, r"monitor\.every_n_steps: Input should be greater than or equal to 1"),
        ({"n_prompts": 0}, r"monitor\.n_prompts: Input should be greater than or equal to 1"),
        ({"min_cosine": 1.5}, r"monitor\.min_cosine: Input should be less than or equal to 1"),
        ({"max_score_drop": -1}, r"monitor\.max_score_drop: Input should be greater than or equal to 0"),
        ({"action": "panic"}, r"monitor\.action: Input should be 'warn', 'stop' or 'restore'"),
        ({"n_prompt": 8}, r"monitor\.n_prompt: Extra inputs are not permitted"),
        ({"min_cosine": None, "max_score_drop": None}, r"monitor: .*set at least one of min_cosine, max_score_drop"),
    ],
)
def test_config_errors_name_the_key(section, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config({"artifact": "a", "monitor": section})


def test_config_defaults_and_alongside_procon():
    c = load_config({"artifact": "a", "procon": {"weight": 100}, "monitor": {"every_n_steps": 10, "action": "restore"}})
    m = c.section("monitor")
    assert set(c.constraint_configs()) == {"procon", "monitor"}
    assert (m.every_n_steps, m.n_prompts, m.min_cosine, m.max_score_drop, m.max_projection_shift, m.action) == (
        10, 32, 0.5, 2.0, None, "restore")
    assert (m.prompts, m.harmless_prompts) == ("harmful", "harmless")
    assert load_config({"artifact": "a", "monitor": None}).section("monitor").action == "warn"


@pytest.mark.parametrize("lora", [False, True])
def test_lenient_run_logs_metrics_and_never_alerts(artifact_dir, tok, chat_rows, tmp_path, lora):
    c = cfg(artifact_dir, procon={"weight": 100.0} if lora else None, every_n_steps=2, action="stop", **LENIENT)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr, _ = train("callback", chat_rows, tok, tmp_path, c, lora=lora)
    assert not [w for w in caught if "monitor" in str(w.message)]
    assert tr.state.global_step == 4 and engine_of(tr).stop_reason is None
    layers = next(x for x in engine_of(tr).constraints if isinstance(x, SafetyMonitor))._layers
    logs = logs_of(tr)
    assert [h["safeguard/monitor_alerts"] for h in logs] == [0.0] * 4
    keys = ["safeguard/monitor_cosine", "safeguard/monitor_refusal_score", "safeguard/monitor_score_drop",
            "safeguard/monitor_projection_shift"] + [f"safeguard/monitor_cosine_l{layer}" for layer in layers]
    for h in logs:  # measured at steps 2 and 4 only; reported once
        assert all((k in h) == (h["step"] % 2 == 0) for k in keys), h
    assert all(-1 <= logs[1][f"safeguard/monitor_cosine_l{layer}"] <= 1 for layer in layers)
    if lora:
        assert "safeguard/procon_loss" in logs[0]


def test_stop_ends_training_early_and_logs_reason(artifact_dir, tok, chat_rows, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="safeguard_plugin"), \
            pytest.warns(UserWarning, match="safety monitor alert at step 1: harmful projection moved"):
        tr, _ = train("callback", chat_rows, tok, tmp_path, cfg(artifact_dir, action="stop", **STRICT), **DEGRADE)
    assert tr.state.global_step == 1 < DEGRADE["max_steps"]
    reason = engine_of(tr).stop_reason
    assert reason.startswith("safety monitor alert at step 1") and reason.endswith("training stopped")
    assert f"stopping training at step 1: {reason}" in caplog.text
    assert logs_of(tr)[-1]["safeguard/monitor_alerts"] == 1.0
    assert abs(logs_of(tr)[-1]["safeguard/monitor_projection_shift"]) > 1e-4


@pytest.mark.parametrize("lora", [False, True])
def test_restore_brings_back_original_weights_and_stops(artifact_dir, tok, chat_rows, tmp_path, lora):
    with pytest.warns(UserWarning, match="restored the trainable weights of step 0"):
        tr, final = train("callback", chat_rows, tok, tmp_path, cfg(artifact_dir, action="restore", **STRICT),
                          lora=lora, **DEGRADE)
    assert tr.state.global_step == 1
    original = tiny_model().state_dict()
    if lora:  # LoRA B starts at zero: restored adapters are a no-op on the untouched base weights
        lora_b = [v for k, v in final.items() if "lora_B" in k]
        assert lora_b and all(float(v.abs().max()) == 0.0 for v in lora_b)
        base = tr.model.get_base_model().state_dict()
        base = {k.replace(".base_layer", ""): v for k, v in base.items() if "lora_" not in k}
        assert max_diff(original, base) == 0.0
    else:
        assert max_diff(original, final) == 0.0


def test_restore_uses_the_last_safe_check(artifact_dir, tok, chat_rows, tmp_path, monkeypatch):
    """Checks at steps 1 and 2 pass (snapshot refreshed); step 3 measures NaN -> weights of step 2 come back."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTTrainer

    real, calls = SafetyMonitor._measure, []

    def scripted(self, model, tokenizer):
        calls.append(1)
        m = real(self, model, tokenizer)
        return Measurement(m.cosine, float("nan"), float("nan")) if len(calls) == 4 else m  # 1 = baseline

    monkeypatch.setattr(SafetyMonitor, "_measure", scripted)
    seen = {}

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            seen[state.global_step] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    torch.manual_seed(0)
    c = cfg(artifact_dir, action="restore", **LENIENT)
    tr = SFTTrainer(model=tiny_model(), args=sft_args(tmp_path, max_steps=6), train_dataset=Dataset.from_list(chat_rows),
                    processing_class=tok, callbacks=[SafeguardCallback(c), Record()])
    with pytest.warns(UserWarning, match="restored the trainable weights of step 2"):
        tr.train()
    final = {k: v.detach().clone() for k, v in tr.model.state_dict().items()}
    assert tr.state.global_step == 3 and "refusal score dropped by nan" in engine_of(tr).stop_reason
    assert max_diff(final, seen[2]) == 0.0 and max_diff(final, tiny_model().state_dict()) > 1e-4
    assert max_diff(seen[1], seen[2]) > 1e-5  # the snapshot really moved from step 1 to step 2


def test_warn_completes_the_run(artifact_dir, tok, chat_rows, tmp_path):
    with pytest.warns(UserWarning, match="safety monitor alert") as rec:
        tr, final = train("callback", chat_rows, tok, tmp_path, cfg(artifact_dir, action="warn", **STRICT), **DEGRADE)
    assert tr.state.global_step == DEGRADE["max_steps"] and engine_of(tr).stop_reason is None
    assert len([w for w in rec if "safety monitor alert" in str(w.message)]) == DEGRADE["max_steps"]
    assert logs_of(tr)[-1]["safeguard/monitor_alerts"] == DEGRADE["max_steps"]
    assert max_diff(final, tiny_model().state_dict()) > 1e-3  # nothing was restored


def test_resumed_run_keeps_the_curve_alerts_and_original_baseline(artifact_dir, tok, chat_rows, tmp_path):
    """The monitor's history travels with the checkpoint: the record of a resumed run starts at step 0 with the
    original model's baseline (full fine-tuning: the resumed weights could only give the step-2 values)."""
    from datasets import Dataset
    from trl import SFTTrainer

    c = cfg(artifact_dir, every_n_steps=1, action="warn", **LENIENT)
    first, _ = train("callback", chat_rows, tok, tmp_path, c, max_steps=2, save_strategy="steps", save_steps=2)
    before = next(x for x in engine_of(first).constraints if isinstance(x, SafetyMonitor)).record()
    assert [p["step"] for p in before["curve"]] == [0, 1, 2]
    torch.manual_seed(0)
    tr = SFTTrainer(model=tiny_model(), args=sft_args(tmp_path), train_dataset=Dataset.from_list(chat_rows),
                    processing_class=tok, callbacks=[SafeguardCallback(c)])
    with pytest.warns(UserWarning, match="resuming full fine-tuning"):
        tr.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    after = next(x for x in engine_of(tr).constraints if isinstance(x, SafetyMonitor)).record()
    assert [p["step"] for p in after["curve"]] == [0, 1, 2, 3, 4]
    assert after["curve"][:3] == before["curve"]
    assert after["refusal_score"]["start"] == before["refusal_score"]["start"]
    # the drop after resuming is measured from the original baseline, not from the step-2 weights
    drop = [h["safeguard/monitor_score_drop"] for h in tr.state.log_history if "safeguard/monitor_score_drop" in h]
    assert drop[-1] == pytest.approx(before["refusal_score"]["start"] - after["refusal_score"]["end"], abs=1e-6)


def test_malformed_checkpoint_state_is_refused(artifact_dir, tok):
    from safeguard_plugin.artifacts import Artifact
    from safeguard_plugin.errors import SafeguardRuntimeError

    mon = SafetyMonitor(load_config(cfg(artifact_dir)).section("monitor"), Artifact.load(artifact_dir))
    with pytest.raises(SafeguardRuntimeError, match="malformed"):
        mon.load_state_dict({"history": [{"step": 0}]})
