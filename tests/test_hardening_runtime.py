"""Issue 14, items 4, 5 and 18: runs in which a constraint does nothing fail, naming the cause.

* (4) penalties skipped as non-finite (``nan_policy: skip``) in every micro-batch of the first ``check_first_steps``
  steps, or in more than 10% of the run's penalty evaluations, fail the run; a rare skipped step does not
  (tests/test_procon.py::test_nan_penalty_is_skipped_and_counted);
* (5) a run that ends before ``check_first_steps`` is checked at ``on_train_end``: no position found, or no penalty
  computed, fails it (the Axolotl plugin drives the same callback);
* (18) the data-format hint of the coverage error comes from the integration (``engine.data_format_hint``).
"""

from __future__ import annotations

import pytest
import torch

from safeguard_plugin.engine import SafeguardRuntimeError

from helpers import train


def cfg(artifact_dir, **top):
    return {"artifact": str(artifact_dir), "procon": {"weight": 100.0, "warmup_ratio": 0.0}, **top}


def _nan_on(monkeypatch, calls_to_poison=None):
    """ProCon's penalty becomes NaN on the given (1-based) calls, on every call when None."""
    from safeguard_plugin.constraints import procon

    real, calls = procon.ProCon.penalty, []

    def penalty(self, batch):
        calls.append(1)
        p = real(self, batch)
        return p * float("nan") if calls_to_poison is None or len(calls) in calls_to_poison else p

    monkeypatch.setattr(procon.ProCon, "penalty", penalty)
    return calls


TEXT_ROWS = [{"text": f"plain text number {i} without any chat formatting"} for i in range(16)]


# ------------------------------------------------------------------------------------------- (4) skipped penalties
def test_penalty_always_skipped_fails_at_check_first_steps(artifact_dir, tok, chat_rows, tmp_path, monkeypatch):
    calls = _nan_on(monkeypatch)
    with pytest.warns(UserWarning, match="non-finite penalty"), pytest.raises(SafeguardRuntimeError) as err:
        train("callback", chat_rows, tok, tmp_path, cfg(artifact_dir), max_steps=8)
    msg = str(err.value)
    assert "skipped (nan_policy: skip) in 3 of 3 micro-batches (non-finite from 'procon' in 3)" in msg
    assert "every penalty of the first 3 optimizer step(s), so no constraint applied" in msg
    assert f"safeguard inspect {artifact_dir}" in msg and "not a dead constraint" in msg
    assert len(calls) == 3  # failed at step 3, not at the end of the 8-step run


def test_nan_artifact_direction_fails_the_run(artifact_dir, tok, chat_rows, tmp_path, monkeypatch):
    """A NaN direction (as a corrupt artifact holds; the loader's own checks aside) makes every penalty NaN."""
    from safeguard_plugin.constraints import procon

    real_init = procon.ProCon.__init__

    def init(self, config, artifact):
        real_init(self, config, artifact)
        self.r = torch.full_like(self.r, float("nan"))

    monkeypatch.setattr(procon.ProCon, "__init__", init)
    with pytest.warns(UserWarning, match="non-finite penalty"), \
            pytest.raises(SafeguardRuntimeError, match=r"non-finite from 'procon' in 2\).*first 2 optimizer step"):
        train("callback", chat_rows, tok, tmp_path, cfg(artifact_dir, check_first_steps=2), max_steps=4)


def test_penalty_skipped_in_more_than_10_percent_fails_at_the_end(artifact_dir, tok, chat_rows, tmp_path, monkeypatch):
    _nan_on(monkeypatch, {2, 7})  # 2 of 10 micro-batches
    with pytest.warns(UserWarning, match="non-finite penalty"), pytest.raises(SafeguardRuntimeError) as err:
        train("callback", chat_rows, tok, tmp_path, cfg(artifact_dir), max_steps=10)
    assert "in 2 of 10 micro-batches" in str(err.value)
    assert "20% of the run's penalties, more than the 10% nan_policy: skip tolerates" in str(err.value)


@pytest.mark.parametrize("kind", ["callback", "mixin"])
def test_short_run_with_every_penalty_skipped_fails_at_the_end(artifact_dir, tok, chat_rows, tmp_path, monkeypatch,
                                                              kind):
    _nan_on(monkeypatch)
    with pytest.warns(UserWarning, match="non-finite penalty"), \
            pytest.raises(SafeguardRuntimeError, match=r"2 of 2 micro-batches.*first 2 optimizer step"):
        train(kind, chat_rows, tok, tmp_path, cfg(artifact_dir), max_steps=2)  # check_first_steps is 3


# ------------------------------------------------------------------------------------------- (5) end of training
@pytest.mark.parametrize("kind", ["callback", "mixin"])
def test_short_run_without_chat_template_fails_at_the_end(artifact_dir, tok, tmp_path, kind):
    from safeguard_plugin.engine import TRL_DATA_FORMAT_HINT

    with pytest.raises(SafeguardRuntimeError) as err:
        train(kind, TEXT_ROWS, tok, tmp_path, cfg(artifact_dir), max_steps=2)  # check_first_steps is 3
    msg = str(err.value)
    assert "post-instruction tokens" in msg and "in none of the 8 training examples of the 2 training step(s)" in msg
    assert "position_coverage 0.0" in msg and TRL_DATA_FORMAT_HINT in msg


def test_run_that_never_computes_a_penalty_fails_at_the_end(artifact_dir, tok, chat_rows, tmp_path, monkeypatch):
    from safeguard_plugin.constraints import procon

    monkeypatch.setattr(procon.ProCon, "penalty", lambda self, batch: None)  # e.g. every reference value missing
    with pytest.raises(SafeguardRuntimeError, match=r"constraint 'procon' computed no penalty in any of the 4 training "
                                                    r"forwards of this run \(4 optimizer steps\); post-instruction "
                                                    r"positions were found in 16 of 16 rows"):
        train("callback", chat_rows, tok, tmp_path, cfg(artifact_dir), max_steps=4)


def test_adaptive_kl_below_risk_floor_warns_instead_of_failing(tok, chat_rows, tmp_path):
    """No penalty because every example is below risk_floor is what the user configured: a warning, not a failure."""
    c = {"adaptive_kl": {"risk": "constant", "risk_options": {"score": 1}, "risk_floor": 2.0}}
    with pytest.warns(UserWarning, match=r"adaptive_kl computed no penalty in this run: every training example scored "
                                         r"below adaptive_kl\.risk_floor \(2\)"):
        train("callback", chat_rows, tok, tmp_path, c, lora=True, max_steps=2)


def test_healthy_short_run_passes_the_end_checks(artifact_dir, tok, chat_rows, tmp_path):
    tr, _ = train("callback", chat_rows, tok, tmp_path, cfg(artifact_dir), max_steps=2)
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert [h["safeguard/nan_skipped"] for h in logs] == [0, 0] and logs[-1]["safeguard/position_coverage"] == 1.0


# ------------------------------------------------------------------------------------------- (18) the hint
def test_coverage_error_takes_the_integrations_hint(artifact_dir, tok, tmp_path):
    from datasets import Dataset
    from trl import SFTTrainer

    from safeguard_plugin.engine import TRL_DATA_FORMAT_HINT
    from safeguard_plugin.integrations.trl import SafeguardCallback
    from safeguard_plugin.testing import tiny_model

    from helpers import sft_args

    assert "TRL" in TRL_DATA_FORMAT_HINT and "'messages'" in TRL_DATA_FORMAT_HINT
    cb = SafeguardCallback(cfg(artifact_dir))
    cb.engine.data_format_hint = "Set `type: chat_template` in the YAML."
    tr = SFTTrainer(model=tiny_model(), args=sft_args(tmp_path), train_dataset=Dataset.from_list(TEXT_ROWS),
                    processing_class=tok, callbacks=[cb])
    with pytest.raises(SafeguardRuntimeError) as err:
        tr.train()
    assert str(err.value).endswith("Set `type: chat_template` in the YAML.") and "TRL" not in str(err.value)


def test_axolotl_plugin_gives_a_yaml_hint():
    plugin = pytest.importorskip("safeguard_plugin.integrations.axolotl.plugin")  # needs axolotl (.venv-axolotl)
    hint = plugin.AXOLOTL_DATA_FORMAT_HINT
    assert "type: chat_template" in hint and "chat_template: tokenizer_default" in hint and "TRL" not in hint
    import inspect

    assert "callback.engine.data_format_hint = AXOLOTL_DATA_FORMAT_HINT" in inspect.getsource(
        plugin.SafeguardPlugin.add_callbacks_post_trainer)
