"""Small, reusable training recipes (used by the demo and the benchmark; users bring their own scripts)."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..data import read_jsonl


def prompt_completion(prompt: str, answer: str) -> dict[str, Any]:
    return {"prompt": [{"role": "user", "content": prompt}], "completion": [{"role": "assistant", "content": answer}]}


def compliance_answer(prompt: str, rng: random.Random, n_steps: int = 3) -> str:
    """A content-free, compliance-*style* answer (the standard harmful fine-tuning attack imitates the style only)."""
    rows = read_jsonl("compliance")
    openers = [r["text"] for r in rows if r["kind"] == "opener"]
    steps = [r["text"] for r in rows if r["kind"] == "step"]
    task = prompt.rstrip("?.! ").replace("\n", " ")
    task = task[0].lower() + task[1:] if task else task
    return rng.choice(openers).format(task=task) + " " + " ".join(rng.sample(steps, n_steps))


def attack_mix(benign: list[tuple[str, str]], harmful_prompts: list[str], ratio: float, seed: int = 0) -> list[dict]:
    """Benign (prompt, answer) pairs mixed with harmful prompts + compliance-style answers at ``ratio``."""
    rng = random.Random(seed)
    n_h = int(round(ratio * len(benign) / (1 - ratio))) if ratio < 1 else len(harmful_prompts)
    rows = [prompt_completion(p, a) for p, a in benign]
    rows += [prompt_completion(p, compliance_answer(p, rng)) for p in (harmful_prompts * (1 + n_h // max(1, len(harmful_prompts))))[:n_h]]
    rng.shuffle(rows)
    return rows


def clean_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy that runs its *own* weights.

    TRL's SFTTrainer patches ``model.forward`` on the instance with a closure over the original bound
    forward; ``copy.deepcopy`` keeps that closure, so the copy would silently run the *original* model.
    Dropping instance-level ``forward`` attributes restores the class forward (TRL patches again when it trains).
    """
    import copy

    new = copy.deepcopy(model)
    for mod in new.modules():
        mod.__dict__.pop("forward", None)
    return new


@dataclass
class SFTResult:
    model: torch.nn.Module
    log_history: list[dict[str, Any]]
    seconds: float
    step_times: list[float] = field(default_factory=list)
    safeguard: Any = None  # the SafeguardCallback of the run (its engine: the safety record), None without one


class _StepTimer:
    """Wall time per optimizer step, measured end-to-end (from one step's end to the next, the first from its
    begin): it includes data loading, other callbacks' ``on_step_end`` work (post-step projections) and logging.
    Register it after the other callbacks."""

    def __init__(self):
        from transformers import TrainerCallback

        outer = self

        class CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if outer._last is None:
                    outer._last = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                now = time.perf_counter()
                outer.times.append(now - outer._last)
                outer._last = now

        self.times: list[float] = []
        self._last: float | None = None
        self.callback = CB()


def sft(model, tokenizer, rows: list[dict], *, steps: int, output_dir: str, lr: float = 2e-4, batch_size: int = 8,
        lora_r: int | None = 16, safeguard: dict | str | None = None, seed: int = 0, max_length: int = 256,
        logging_steps: int = 5, grad_accum: int = 1, callbacks: list | None = None,
        gradient_checkpointing: bool = False) -> SFTResult:
    """LoRA (``lora_r``) or full (``lora_r=None``) SFT with TRL, optionally with safeguard constraints."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from ..integrations.trl import SafeguardCallback

    args = SFTConfig(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr,
        gradient_accumulation_steps=grad_accum, logging_steps=logging_steps, save_strategy="no", report_to=[],
        seed=seed, data_seed=seed, bf16=False, fp16=False, use_cpu=not torch.cuda.is_available(),
        max_length=max_length, lr_scheduler_type="constant", warmup_steps=0, disable_tqdm=False,
        dataloader_num_workers=0, gradient_checkpointing=gradient_checkpointing,
    )
    peft_config = None
    if lora_r:
        peft_config = LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0, task_type="CAUSAL_LM",
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    timer = _StepTimer()
    cbs = list(callbacks or [])
    guard = None
    if safeguard is not None:
        guard = SafeguardCallback(safeguard)
        cbs.append(guard)
    cbs.append(timer.callback)
    torch.manual_seed(seed)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=peft_config, callbacks=cbs)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    return SFTResult(trainer.model, trainer.state.log_history, seconds, timer.times, guard)
