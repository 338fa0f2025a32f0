"""The trainer's own saves and resumes under SafeguardCallback.

* GuardSpace (issue 14, item 19): ``trainer.save_model(dir)`` and every checkpoint write what plain LoRA would -- a
  standard PEFT adapter (the projector and the residual folded in) plus the GuardSpace files -- never a full
  ``model.safetensors`` with PEFT-internal key names; both ``PeftModel.from_pretrained(base, dir)`` and
  ``load_guardspace(base, dir)`` give the trained model; resuming from such a checkpoint continues the same run.
* Resume (item 9): the plugin state comes from the checkpoint the Trainer actually resumes from (a moved checkpoint
  with another ``output_dir``, or ``resume_from_checkpoint=True``).
"""

import shutil
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import PeftModel

from safeguard_plugin.constraints.guardspace import (
    GuardSpaceError,
    calibrate_guardspace,
    load_guardspace,
    prepare_guardspace_model,
    restore_guardspace_factors,
    save_guardspace,
)
from safeguard_plugin.modeling import pad_right, tokenize_prompts
from safeguard_plugin.testing import tiny_model

from helpers import max_diff, sft_args, train

HIDDEN, RANK = 256, 4
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "guardspace.json", "guardspace.safetensors"}


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def gs_path(tmp_path_factory, tok, harmful):
    out = tmp_path_factory.mktemp("gs") / "art"
    calibrate_guardspace(tiny_model(hidden=HIDDEN), tok, harmful,
                         config={"null_energy": 0.01, "calibration": {"calibration_rank": 8}},
                         out_dir=out, model_id="tiny256", progress=False)
    return out


@pytest.fixture(scope="module")
def batch(tok, harmful):
    return pad_right(tokenize_prompts(tok, harmful), tok.pad_token_id)


def logits(m, batch):
    m.eval()
    with torch.no_grad():
        return m(input_ids=batch[0], attention_mask=batch[1]).logits[batch[1].bool()]


def gs_cfg(path):
    return {"artifact": str(path), "guardspace": {"rank": RANK}}


def resume(rows, tok, out, cfg, checkpoint, lora=False):
    """A new process's trainer (fresh model, same config) resuming from ``checkpoint``; ``out`` is its output_dir."""
    from peft import LoraConfig
    from trl import SFTTrainer

    from safeguard_plugin.integrations.trl import SafeguardCallback

    torch.manual_seed(0)
    peft = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0,
                      task_type="CAUSAL_LM") if lora else None
    m = tiny_model(hidden=HIDDEN) if "guardspace" in cfg else tiny_model()
    tr = SFTTrainer(model=m, args=sft_args(out), train_dataset=Dataset.from_list(rows), processing_class=tok,
                    peft_config=peft, callbacks=[SafeguardCallback(cfg)])
    tr.train(resume_from_checkpoint=checkpoint)
    return tr


@pytest.mark.parametrize("lora", [False, True], ids=["injected", "peft_config"])
def test_save_model_and_checkpoints_write_a_standard_adapter_loadable_both_ways(gs_path, tok, chat_rows, batch,
                                                                                 tmp_path, lora):
    """injected: GuardSpace adds the adapters to a plain model (no peft_config) -- the trainer used to write a full
    model.safetensors with ``base_layer`` / ``lora_A.default`` keys that PeftModel cannot load. peft_config: the
    trainer's LoRA is converted in place -- the trainer used to write the plain LoRA factors, which on the original
    base are another model (no projector, no residual)."""
    out = tmp_path / "run"
    tr, _ = train("callback", chat_rows, tok, out, gs_cfg(gs_path), lora=lora, model=tiny_model(hidden=HIDDEN),
                  max_steps=3, save_strategy="steps", save_steps=2)
    trained = logits(tr.model, batch)
    final = tmp_path / "final"
    tr.save_model(str(final))
    for folder in (final, out / "checkpoint-2"):
        names = {p.name for p in folder.iterdir()}
        assert ADAPTER_FILES <= names, (folder, sorted(names))
        assert not names & {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}, sorted(names)
        assert {"tokenizer_config.json", "training_args.bin"} <= names  # the rest of the trainer's save is unchanged
    # vanilla PEFT on the original base model, and the GuardSpace loader (trainable again): the trained model
    vanilla = PeftModel.from_pretrained(tiny_model(hidden=HIDDEN), final)
    assert (logits(vanilla, batch) - trained).abs().max() < 1e-4
    reloaded = load_guardspace(tiny_model(hidden=HIDDEN), final)
    assert (logits(reloaded, batch) - trained).abs().max() < 1e-5
    assert any(p.requires_grad for p in reloaded.parameters())
    # the step-2 checkpoint loads the same way; it is the model one step earlier
    ckpt = PeftModel.from_pretrained(tiny_model(hidden=HIDDEN), out / "checkpoint-2")
    assert (logits(ckpt, batch) - logits(load_guardspace(tiny_model(hidden=HIDDEN), out / "checkpoint-2"), batch)
            ).abs().max() < 1e-4
    assert (logits(ckpt, batch) - trained).abs().max() > 1e-4
    # no extra copies elsewhere: the trainer's own folders hold the adapter
    assert not (out / "guardspace").exists() and not (out / "checkpoint-2" / "guardspace").exists()


def test_push_to_hub_uploads_the_standard_adapter(gs_path, tok, chat_rows, batch, tmp_path, monkeypatch):
    """push_to_hub saves through save_model(_internal_call=True) into output_dir, then uploads that folder (the upload
    is stubbed: no network)."""
    import transformers.trainer as trainer_module

    uploaded = {}

    class Api:
        def upload_folder(self, folder_path, **kwargs):
            uploaded.update({p.name: p for p in Path(folder_path).iterdir()})

    monkeypatch.setattr(trainer_module, "hf_api", lambda: Api())
    tr, _ = train("callback", chat_rows, tok, tmp_path, gs_cfg(gs_path), model=tiny_model(hidden=HIDDEN), max_steps=1)
    tr.hub_model_id = "someone/guardspace-test"  # skips creating the repo
    trained = logits(tr.model, batch)
    tr.push_to_hub(blocking=True)
    assert ADAPTER_FILES <= set(uploaded) and "model.safetensors" not in uploaded, sorted(uploaded)
    vanilla = PeftModel.from_pretrained(tiny_model(hidden=HIDDEN), tmp_path)
    assert (logits(vanilla, batch) - trained).abs().max() < 1e-4


@pytest.mark.parametrize("lora", [False, True], ids=["injected", "peft_config"])
def test_resume_from_a_guardspace_checkpoint_continues_the_run(gs_path, tok, chat_rows, batch, tmp_path, lora, caplog):
    """The checkpoint holds the exported adapter (rank 2r, projector folded in), not the trainer's own format: the
    resume loads the trained factors back into the adapters the callback set up (load_model), and the resumed run
    ends where the uninterrupted one does."""
    import logging

    cfg = gs_cfg(gs_path)
    full, _ = train("callback", chat_rows, tok, tmp_path / "full", cfg, lora=lora, model=tiny_model(hidden=HIDDEN))
    half, _ = train("callback", chat_rows, tok, tmp_path / "a", cfg, lora=lora, model=tiny_model(hidden=HIDDEN),
                    max_steps=2, save_strategy="steps", save_steps=2)
    assert (logits(half.model, batch) - logits(full.model, batch)).abs().max() > 1e-4
    ckpt = tmp_path / "a" / "checkpoint-2"
    with caplog.at_level(logging.INFO, logger="safeguard_plugin"):
        tr = resume(chat_rows, tok, tmp_path / "b", cfg, str(ckpt), lora=lora)
    assert f"guardspace restored the model from {ckpt}" in caplog.text
    assert (logits(tr.model, batch) - logits(full.model, batch)).abs().max() < 1e-5


def test_restoring_into_another_guardspace_setup_is_refused_naming_the_fix(gs_path, batch, tmp_path):
    m = prepare_guardspace_model(tiny_model(hidden=HIDDEN), gs_path, rank=RANK)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.add_(0.01 * torch.randn_like(p))
    save_guardspace(m, tmp_path / "gs")
    same = prepare_guardspace_model(tiny_model(hidden=HIDDEN), gs_path, rank=RANK)
    assert restore_guardspace_factors(same, tmp_path / "gs")
    assert (logits(same, batch) - logits(m, batch)).abs().max() < 1e-5
    assert not restore_guardspace_factors(same, tmp_path)  # no GuardSpace save there: the trainer's own load runs
    other = prepare_guardspace_model(tiny_model(hidden=HIDDEN), gs_path, rank=2)
    with pytest.raises(GuardSpaceError, match=r"saved from another GuardSpace set-up.*resume with the artifact"):
        restore_guardspace_factors(other, tmp_path / "gs")
    fewer = prepare_guardspace_model(tiny_model(hidden=HIDDEN), gs_path, rank=RANK, target_modules=["q_proj"])
    with pytest.raises(GuardSpaceError, match=r"layers differ from this model's.*load_guardspace\(base_model"):
        restore_guardspace_factors(fewer, tmp_path / "gs")


def test_resume_reads_the_plugin_state_from_the_checkpoint_it_resumes_from(artifact_dir, tok, chat_rows, tmp_path):
    """Full fine-tuning with ProCon needs the saved reference cache. A checkpoint moved elsewhere, resumed with another
    output_dir, used to fail naming <output_dir>/checkpoint-2; resume_from_checkpoint=True keeps working."""
    c = {"artifact": str(artifact_dir), "procon": {"weight": 100.0, "warmup_ratio": 0.0, "warmup_steps": 3,
                                                 "warmup_factor": 10.0}}
    full_tr, full = train("callback", chat_rows, tok, tmp_path / "full", c)
    train("callback", chat_rows, tok, tmp_path / "a", c, max_steps=2, save_strategy="steps", save_steps=2)
    moved = tmp_path / "moved" / "checkpoint-2"
    moved.parent.mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-2", moved)
    lam = lambda t: [h["safeguard/procon_lambda"] for h in t.state.log_history if "loss" in h]  # noqa: E731
    for out, ckpt in ((tmp_path / "b", str(moved)), (tmp_path / "a", True)):
        tr = resume(chat_rows, tok, out, c, ckpt)
        assert lam(tr) == lam(full_tr) == [1000.0, 1000.0, 1000.0, 100.0]
        assert max_diff(full, {k: v.detach() for k, v in tr.model.state_dict().items()}) < 1e-5
    assert not (tmp_path / "b" / "checkpoint-2").exists()


def test_load_best_model_at_end_restores_a_guardspace_checkpoint(gs_path, tok, chat_rows, batch, tmp_path, caplog):
    import logging

    from trl import SFTTrainer

    from safeguard_plugin.integrations.trl import SafeguardCallback

    torch.manual_seed(0)
    args = sft_args(tmp_path, max_steps=3, save_strategy="steps", save_steps=1, eval_strategy="steps", eval_steps=1,
                    load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=True)
    ds = Dataset.from_list(chat_rows)
    tr = SFTTrainer(model=tiny_model(hidden=HIDDEN), args=args, train_dataset=ds, eval_dataset=ds.select(range(4)),
                    processing_class=tok, callbacks=[SafeguardCallback(gs_cfg(gs_path))])
    with caplog.at_level(logging.INFO, logger="safeguard_plugin"):
        tr.train()
    best = tr.state.best_model_checkpoint
    assert best and not best.endswith("checkpoint-3")  # the highest eval loss: not the last step
    assert f"guardspace restored the best model from {best}" in caplog.text
    assert (logits(tr.model, batch) - logits(load_guardspace(tiny_model(hidden=HIDDEN), best), batch)).abs().max() < 1e-5
