"""Shared training helpers for the tests (tiny models, a few steps, CPU)."""

from __future__ import annotations

import torch
from datasets import Dataset


def sft_args(out, **kw):
    from trl import SFTConfig

    base = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1,
                report_to=[], use_cpu=True, bf16=False, save_strategy="no", seed=0, data_seed=0, disable_tqdm=True,
                lr_scheduler_type="constant", dataloader_num_workers=0)
    base.update(kw)
    return SFTConfig(**base)


def train(kind, rows, tok, out, cfg=None, lora=False, model=None, **kw):
    """kind: 'plain' | 'callback' | 'mixin'. Returns (trainer, state_dict copy)."""
    from peft import LoraConfig
    from trl import SFTTrainer

    from safeguard_plugin.integrations.trl import SafeguardCallback, SafeguardSFTTrainer
    from safeguard_plugin.testing import tiny_model

    torch.manual_seed(0)
    model = model if model is not None else tiny_model()
    peft = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0,
                      task_type="CAUSAL_LM") if lora else None
    args = sft_args(out, **kw)
    ds = Dataset.from_list(rows)
    if kind == "plain":
        tr = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft)
    elif kind == "callback":
        tr = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft,
                        callbacks=[SafeguardCallback(cfg)])
    elif kind == "mixin":
        tr = SafeguardSFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft,
                                 safeguard=cfg)
    else:
        raise ValueError(kind)
    tr.train()
    return tr, {k: v.detach().clone() for k, v in tr.model.state_dict().items()}


def max_diff(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)
