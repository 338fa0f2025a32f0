"""ProCon through the TRL paths: zero at step 0, changes training, callback == mixin, NaN guard, resume."""

import math

import pytest
import torch

from safeguard_plugin.engine import SafeguardEngine, SafeguardRuntimeError
from safeguard_plugin.modeling import pad_right, tokenize_prompts
from safeguard_plugin.testing import tiny_model

from helpers import max_diff, train


def cfg(artifact_dir, **procon):
    return {"artifact": str(artifact_dir), "procon": {"weight": 100.0, "warmup_ratio": 0.0, **procon}}


def test_penalty_zero_at_step0_and_gradient_reaches_weights(artifact_dir, tok):
    model = tiny_model()
    eng = SafeguardEngine(cfg(artifact_dir)).setup(model, tok)
    seqs = [s + [5, 6, 7] for s in tokenize_prompts(tok, ["How do I pick a lock?", "Tell me about bread baking"])]
    ids, mask = pad_right(seqs, 0)
    eng.precompute_references([{"input_ids": ids}], progress=False)
    eng.begin_training(max_steps=10, grad_accum=1)
    model.train()
    model(input_ids=ids, attention_mask=mask).logits.sum().backward()
    assert eng.metrics()["safeguard/procon_loss"] == pytest.approx(0.0, abs=1e-10)
    # perturb the weights: the penalty becomes positive and adds gradient that plain backprop does not have
    with torch.no_grad():
        for p in model.model.layers[0].parameters():
            p.add_(0.05 * torch.randn_like(p))
    grads = {}
    for use in (True, False):
        model.zero_grad()
        if not use:
            assert eng.metrics()["safeguard/procon_loss"] > 1e-3
            eng.detach()
        model(input_ids=ids, attention_mask=mask).logits.sum().backward()
        grads[use] = model.model.layers[0].mlp.up_proj.weight.grad.clone()
    assert (grads[True] - grads[False]).abs().max() > 1e-4


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("ga", [1, 2])
def test_callback_and_mixin_match_and_differ_from_plain(artifact_dir, tok, chat_rows, tmp_path, lora, ga):
    kw = dict(gradient_accumulation_steps=ga, per_device_train_batch_size=4 // ga)
    plain_tr, plain = train("plain", chat_rows, tok, tmp_path / "p", lora=lora, **kw)
    cb_tr, cb = train("callback", chat_rows, tok, tmp_path / "c", cfg(artifact_dir), lora=lora, **kw)
    mx_tr, mx = train("mixin", chat_rows, tok, tmp_path / "m", cfg(artifact_dir), lora=lora, **kw)
    assert max_diff(cb, mx) < 1e-6
    assert max_diff(cb, plain) > 1e-4
    cb_pen = [h["safeguard/procon_loss"] for h in cb_tr.state.log_history if "safeguard/procon_loss" in h]
    mx_pen = [h["safeguard/procon_loss"] for h in mx_tr.state.log_history if "safeguard/procon_loss" in h]
    assert len(cb_pen) == 4 and cb_pen == pytest.approx(mx_pen, rel=1e-5, abs=1e-9)
    assert cb_pen[0] < 1e-6 < max(cb_pen)  # ~0 before the first update, then the constraint is active
    # the mixin's logged loss includes the penalty; the callback's is the task loss of the same trajectory
    cb_loss = [h["loss"] for h in cb_tr.state.log_history if "loss" in h]
    mx_loss = [h["loss"] for h in mx_tr.state.log_history if "loss" in h]
    for c, m, p in zip(cb_loss, mx_loss, cb_pen):
        assert m == pytest.approx(c + p, rel=1e-4, abs=1e-5)


def test_metrics_in_training_log(artifact_dir, tok, chat_rows, tmp_path):
    tr, _ = train("callback", chat_rows, tok, tmp_path, cfg(artifact_dir, warmup_steps=2, warmup_factor=5.0))
    logs = [h for h in tr.state.log_history if "loss" in h]
    from safeguard_plugin.integrations.trl import SafeguardCallback

    (cb,) = [c for c in tr.callback_handler.callbacks if isinstance(c, SafeguardCallback)]
    layers = cb.engine.constraints[0].layers()
    for key in ["safeguard/procon_loss", "safeguard/procon_lambda", "safeguard/procon_drift",
                f"safeguard/procon_drift_l{layers[0]}", "safeguard/position_coverage", "safeguard/nan_skipped"]:
        assert all(key in h for h in logs), key
    assert [h["safeguard/procon_lambda"] for h in logs] == [500.0, 500.0, 100.0, 100.0]


def test_nan_penalty_is_skipped_and_counted(artifact_dir, tok, chat_rows, tmp_path, monkeypatch):
    """A rare non-finite penalty (1 of 10 micro-batches, at the 10% that nan_policy: skip tolerates) is skipped with a
    warning and counted; a penalty that is always non-finite fails the run (tests/test_hardening_runtime.py)."""
    from safeguard_plugin.constraints import procon

    real, calls = procon.ProCon.penalty, []

    def sometimes_nan(self, batch):
        calls.append(1)
        p = real(self, batch)
        return p * float("nan") if len(calls) == 3 else p

    monkeypatch.setattr(procon.ProCon, "penalty", sometimes_nan)
    with pytest.warns(UserWarning, match="non-finite penalty"):
        tr, guarded = train("callback", chat_rows, tok, tmp_path, cfg(artifact_dir), max_steps=10)
    assert all(math.isfinite(v.float().sum().item()) for v in guarded.values())
    nan = [h["safeguard/nan_skipped"] for h in tr.state.log_history if "loss" in h]
    assert nan == [0, 0] + [1] * 8  # step 3's penalty skipped, the others applied


def test_nan_policy_raise(artifact_dir, tok, chat_rows, tmp_path, monkeypatch):
    from safeguard_plugin.constraints import procon

    monkeypatch.setattr(procon.ProCon, "penalty", lambda self, batch: torch.tensor(float("inf")))
    c = cfg(artifact_dir)
    c["nan_policy"] = "raise"
    with pytest.raises(SafeguardRuntimeError, match="penalty is inf"):
        train("callback", chat_rows, tok, tmp_path, c)


def test_data_without_chat_template_fails_the_run(artifact_dir, tok, tmp_path):
    rows = [{"text": f"plain text number {i} without any chat formatting"} for i in range(16)]
    with pytest.raises(SafeguardRuntimeError, match="post-instruction tokens"):
        train("callback", rows, tok, tmp_path, cfg(artifact_dir), max_steps=4)


def test_resume_from_checkpoint_continues_schedule_and_references(artifact_dir, tok, chat_rows, tmp_path):
    c = cfg(artifact_dir, warmup_steps=3, warmup_factor=10.0)
    full_tr, full = train("callback", chat_rows, tok, tmp_path / "full", c)
    first_tr, _ = train("callback", chat_rows, tok, tmp_path / "res", c, max_steps=2, save_strategy="steps", save_steps=2)
    assert (tmp_path / "res" / "checkpoint-2" / "safeguard_state.safetensors").is_file()
    from datasets import Dataset
    from trl import SFTTrainer

    from safeguard_plugin.integrations.trl import SafeguardCallback

    from helpers import sft_args

    torch.manual_seed(0)
    tr = SFTTrainer(model=tiny_model(), args=sft_args(tmp_path / "res"), train_dataset=Dataset.from_list(chat_rows),
                    processing_class=tok, callbacks=[SafeguardCallback(c)])
    tr.train(resume_from_checkpoint=str(tmp_path / "res" / "checkpoint-2"))
    resumed = {k: v.detach().clone() for k, v in tr.model.state_dict().items()}
    lam = lambda t: [h["safeguard/procon_lambda"] for h in t.state.log_history if "loss" in h]  # noqa: E731
    assert lam(full_tr) == [1000.0, 1000.0, 1000.0, 100.0]
    assert lam(tr) == lam(full_tr)  # history 1-2 restored from the checkpoint, 3-4 trained after resume
    assert max_diff(full, resumed) < 1e-5


def test_hooks_that_never_fire_fail_the_run(artifact_dir, tok, chat_rows, tmp_path, monkeypatch):
    monkeypatch.setattr(SafeguardEngine, "_attach", lambda self: None)
    with pytest.raises(SafeguardRuntimeError, match="did not run"):
        train("callback", chat_rows, tok, tmp_path, cfg(artifact_dir))


def test_zero_weight_is_bit_identical_to_plain(artifact_dir, tok, chat_rows, tmp_path):
    _, plain = train("plain", chat_rows, tok, tmp_path / "p")
    _, zero = train("callback", chat_rows, tok, tmp_path / "z", cfg(artifact_dir, weight=0.0))
    assert max_diff(plain, zero) == 0.0
