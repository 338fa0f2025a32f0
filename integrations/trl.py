"""TRL / transformers integration.

Two equivalent ways in (same losses and weights; tested):

* ``SFTTrainer(..., callbacks=[SafeguardCallback("safeguard.yaml")])`` -- one argument on an existing script.
* ``SafeguardSFTTrainer(..., safeguard="safeguard.yaml")`` or ``class MyTrainer(SafeguardTrainerMixin, Trainer)``
  -- the penalty is added to the loss ``compute_loss`` returns.

A ``TrainerCallback`` cannot change the loss through its return value, and TRL's SFTTrainer ignores
``outputs.loss``; the callback therefore attaches the penalty's gradient inside the model's forward
(see :mod:`safeguard_plugin.engine`). It fails the run, naming the fix, when it cannot attach.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any

from torch.utils.data import DataLoader, IterableDataset
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..config import SafeguardConfig
from ..engine import SafeguardEngine, SafeguardRuntimeError
from ..modeling import is_peft_model, unwrap_model

logger = logging.getLogger("safeguard_plugin")

GUARDSPACE_SUBDIR = "guardspace"  # <checkpoint or output dir>/guardspace: save_guardspace's folder (projector kept)

__all__ = ["SafeguardCallback", "SafeguardTrainerMixin", "SafeguardSFTTrainer", "loss_is_scaled_for_ga"]


def _find_trainer(callback: TrainerCallback, max_depth: int = 40):
    """The Trainer whose callback handler holds ``callback`` (found on the call stack of its event)."""
    f = sys._getframe(1)
    for _ in range(max_depth):
        if f is None:
            break
        obj = f.f_locals.get("self")
        handler = getattr(obj, "callback_handler", None)
        if handler is not None and any(cb is callback for cb in getattr(handler, "callbacks", [])):
            return obj
        f = f.f_back
    return None


def loss_is_scaled_for_ga(trainer, num_items_in_batch) -> bool:
    """Mirror of transformers' ``Trainer.training_step`` rule: is the loss already divided for accumulation?"""
    flag = getattr(trainer, "loss_is_scaled_for_ga", None)
    if flag is not None:
        return bool(flag)
    return bool((getattr(trainer, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
                or getattr(trainer, "compute_loss_func", None) is not None)


class SafeguardCallback(TrainerCallback):
    """Adds the configured safeguard constraints to any transformers/TRL ``Trainer``.

    Args:
        config: YAML path, dict or :class:`SafeguardConfig` (see ``example_yamls/``).
        precompute_references: cache the original model's values for the whole training set at train
            begin (needed for full fine-tuning; under LoRA missing values are also filled lazily).
    """

    def __init__(self, config: str | dict | SafeguardConfig, precompute_references: bool = True, _mode: str = "inject"):
        self.engine = SafeguardEngine(config, mode=_mode)
        self.precompute_references = precompute_references
        self.trainer = None
        self._log_wrapped = False
        self.log = logger  # the Axolotl plugin routes messages to a logger Axolotl shows
        self.save_adapters_at_train_end = True  # False when the caller saves them itself (Axolotl plugin)

    # -- binding
    def _bind(self, trainer, model, tokenizer) -> None:
        if model is None:
            raise SafeguardRuntimeError("SafeguardCallback received no model from the Trainer; cannot attach")
        if trainer is not None:
            self.trainer = trainer
            tokenizer = tokenizer if tokenizer is not None else getattr(trainer, "processing_class", None)
        self.engine.setup(model, getattr(tokenizer, "tokenizer", tokenizer))
        if self.trainer is not None and not self._log_wrapped:
            self._wrap_log(self.trainer)
        logger.warning(self.engine.banner())

    def _wrap_log(self, trainer) -> None:
        original = trainer.log
        engine = self.engine

        def log(logs: dict[str, float], *args: Any, **kwargs: Any):
            if "loss" in logs:
                logs.update(engine.metrics())
            return original(logs, *args, **kwargs)

        trainer.log = log
        self._log_wrapped = True

    # -- events
    def on_init_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        self._bind(_find_trainer(self), model, processing_class)

    def on_train_begin(self, args, state, control, model=None, processing_class=None, train_dataloader=None, **kwargs):
        if self.trainer is None:
            self.trainer = _find_trainer(self)
        current = unwrap_model(self.trainer.model if self.trainer is not None else model)
        if self.engine.model is None or current is not self.engine.model:
            self._bind(self.trainer, current, processing_class)
        self.engine.begin_training(state.max_steps, args.gradient_accumulation_steps, state.global_step)
        if state.global_step > 0:  # resuming: the weights are no longer the original ones
            ckpt = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            if self.engine.load_state(ckpt):
                logger.info("safeguard: restored reference cache from %s", ckpt)
            elif any(c.uses_reference for c in self.engine.constraints) and not is_peft_model(self.engine.model):
                raise SafeguardRuntimeError(
                    f"resuming full fine-tuning at step {state.global_step}, but {ckpt} holds no "
                    f"{self.engine.STATE_FILE}: the original model's reference values cannot be recomputed from "
                    "fine-tuned weights. Resume from a checkpoint written with SafeguardCallback active."
                )
            return
        if not self.precompute_references or not any(c.uses_reference for c in self.engine.constraints):
            return
        ds = getattr(train_dataloader, "dataset", None)
        if ds is None or isinstance(ds, IterableDataset):
            if not is_peft_model(self.engine.model):
                raise SafeguardRuntimeError(
                    "full fine-tuning with an iterable/streaming train dataset: safeguard cannot precompute the "
                    "original model's reference values. Use a map-style dataset, or LoRA (references come from "
                    "the adapter-disabled model)."
                )
            return
        loader = DataLoader(ds, batch_size=args.per_device_train_batch_size, shuffle=False,
                            collate_fn=train_dataloader.collate_fn, num_workers=0)
        # same autocast as the training forward, so cached values match step 0 up to float noise
        accelerator = getattr(self.trainer, "accelerator", None)
        with accelerator.autocast() if accelerator is not None else contextlib.nullcontext():
            n = self.engine.precompute_references(loader, batch_size=max(8, args.per_device_train_batch_size))
        logger.info("safeguard: cached reference values for %d distinct prompts", n)

    def on_step_begin(self, args, state, control, **kwargs):
        self.engine.global_step = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        self.engine.after_step(state.global_step)
        if self.engine.stop_reason:
            logger.warning("safeguard: stopping training at step %d: %s", state.global_step, self.engine.stop_reason)
            control.should_training_stop = True

    def save_adapters(self, folder: str | os.PathLike) -> list[str]:
        """Write the modules a constraint added (GuardSpace: ``save_guardspace``, which keeps the null-space
        projector and exports a standard PEFT adapter with it folded in) to ``folder``; returns the folders written.

        A plain PEFT / Trainer save of a GuardSpace model drops the projector and the residual: that adapter,
        loaded on the original base model, gives a different model than the one trained.
        """
        written = []
        for c in self.engine.constraints:
            save = getattr(c, "save_pretrained", None)
            model = getattr(c, "_model", None)
            if not callable(save) or model is None:
                continue
            if any(hasattr(p, "ds_id") for p in model.parameters()):
                self.log.warning("safeguard: %s adapters are partitioned (DeepSpeed ZeRO-3) and were NOT saved to %s",
                                 c.name, folder)
                continue
            path = save(folder)
            self.log.info("safeguard: saved %s adapters (projector included) to %s; reload with "
                          "load_guardspace(base_model, %r) or PeftModel.from_pretrained(base_model, %r)",
                          c.name, path, str(path), str(path))
            written.append(str(path))
        return written

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            ckpt = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            self.engine.save_state(ckpt)
            self.save_adapters(os.path.join(ckpt, GUARDSPACE_SUBDIR))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self._log_wrapped and logs is not None and "loss" in logs:
            m = self.engine.metrics()
            logs.update(m)
            if state.log_history:
                state.log_history[-1].update(m)

    def on_train_end(self, args, state, control, **kwargs):
        # the trainer's own final save (save_model after train()) would drop GuardSpace's projector: a subfolder
        # it never writes to keeps the complete adapter
        if self.save_adapters_at_train_end and state.is_world_process_zero:
            self.save_adapters(os.path.join(args.output_dir, GUARDSPACE_SUBDIR))


class SafeguardTrainerMixin:
    """Mixin for any transformers ``Trainer`` subclass: ``class T(SafeguardTrainerMixin, Trainer)``.

    Pass ``safeguard=<yaml path | dict | SafeguardConfig>``; the penalty is added to the loss returned by
    ``compute_loss`` (so the logged ``loss`` includes it).
    """

    def __init__(self, *args: Any, safeguard: str | dict | SafeguardConfig | None = None, **kwargs: Any):
        if safeguard is None:
            raise TypeError(f"{type(self).__name__} needs safeguard=<config path | dict | SafeguardConfig>")
        super().__init__(*args, **kwargs)
        self.safeguard = SafeguardCallback(safeguard, _mode="collect")
        self.add_callback(self.safeguard)
        self.safeguard._bind(self, self.model, self.processing_class)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        penalty = self.safeguard.engine.pop_pending_penalty()
        if penalty is None:
            return out
        ga = self.safeguard.engine.grad_accum
        scale = 1.0 / ga if loss_is_scaled_for_ga(self, num_items_in_batch) else 1.0
        if return_outputs:
            loss, outputs = out
            return loss + scale * penalty.to(loss.dtype), outputs
        return out + scale * penalty.to(out.dtype)


def _make_sft_trainer():
    from trl import SFTTrainer

    class SafeguardSFTTrainer(SafeguardTrainerMixin, SFTTrainer):
        """TRL ``SFTTrainer`` with safeguard constraints: ``SafeguardSFTTrainer(..., safeguard="safeguard.yaml")``."""

    return SafeguardSFTTrainer


SafeguardSFTTrainer = _make_sft_trainer()
