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
from ..constraints.base import TrainingSetup
from ..engine import SafeguardEngine, SafeguardRuntimeError
from ..modeling import is_peft_model, unwrap_model
from ..precision import trainer_loss_scale
from ..record import run_record, write_model_card
from ..registry import get_constraint

logger = logging.getLogger("safeguard_plugin")

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


def _resume_checkpoint(callback: TrainerCallback, max_depth: int = 40) -> str | None:
    """The checkpoint the Trainer resumes from, as ``Trainer.train`` resolved it (``resume_from_checkpoint=True``: the
    last checkpoint in ``output_dir``; a path: that folder, wherever it is). No callback argument carries it:
    transformers passes it to ``_inner_training_loop``, which fires ``on_train_begin``, as its ``resume_from_checkpoint``
    argument, so it is read from that frame (the Trainer's frame on the call stack of the event)."""
    f = sys._getframe(1)
    for _ in range(max_depth):
        if f is None:
            break
        handler = getattr(f.f_locals.get("self"), "callback_handler", None)
        if handler is not None and any(cb is callback for cb in getattr(handler, "callbacks", [])):
            path = f.f_locals.get("resume_from_checkpoint")
            if isinstance(path, (str, os.PathLike)):
                return os.fspath(path)
        f = f.f_back
    return None


def training_setup(trainer, model) -> TrainingSetup:
    """The trainer's set-up as ``Constraint.check_training`` sees it: the PEFT method of ``model``'s active adapter
    (``"qlora"`` for LoRA on a 4-/8-bit base), and whether TRL packs several examples into a row (``packing`` or
    ``padding_free``)."""
    adapter = None
    if model is not None and is_peft_model(model):
        peft = unwrap_model(model)
        active = getattr(peft, "active_adapter", "default")
        cfg = getattr(peft, "peft_config", {}).get(active if isinstance(active, str) else "default")
        kind = getattr(cfg, "peft_type", None)
        adapter = str(getattr(kind, "value", kind) or "peft").lower()
        base = peft.get_base_model() if hasattr(peft, "get_base_model") else peft
        if adapter == "lora" and (getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False)):
            adapter = "qlora"
    args = getattr(trainer, "args", None)
    packing = bool(getattr(args, "packing", False) or getattr(args, "padding_free", False))
    return TrainingSetup(adapter=adapter, packing=packing, framework="trl")


def loss_is_scaled_for_ga(trainer, num_items_in_batch) -> bool:
    """Mirror of transformers' ``Trainer.training_step`` rule: is the loss already divided for accumulation?"""
    flag = getattr(trainer, "loss_is_scaled_for_ga", None)
    if flag is not None:
        return bool(flag)
    return bool((getattr(trainer, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
                or getattr(trainer, "compute_loss_func", None) is not None)


class SafeguardCallback(TrainerCallback):
    """Adds the configured safeguard constraints to any transformers/TRL ``Trainer``.

    Two ways to attach it:

    * ``Trainer(..., callbacks=[SafeguardCallback(config)])``: attached when the trainer finishes its ``__init__``
      (the callback then finds its trainer on the call stack of that event).
    * ``SafeguardCallback(config, trainer=trainer)`` then ``trainer.add_callback(...)``: attached to ``trainer.model``
      at once (before the optimizer exists, so model surgery such as GuardSpace's applies), without looking for the
      trainer on the stack.

    Args:
        config: YAML path, dict or :class:`SafeguardConfig` (see ``example_yamls/``).
        precompute_references: cache the original model's values for the whole training set at train
            begin (needed for full fine-tuning; under LoRA missing values are also filled lazily).
        trainer: the trainer this callback serves; given, the callback binds to it now (see :meth:`bind`).
    """

    def __init__(self, config: str | dict | SafeguardConfig, precompute_references: bool = True, _mode: str = "inject",
                 *, trainer=None):
        self.engine = SafeguardEngine(config, mode=_mode)
        self.precompute_references = precompute_references
        self.trainer = None
        self._log_wrapped = False
        self.log = logger  # the Axolotl plugin routes messages to a logger Axolotl shows
        self._save_wrapped_for = None  # the trainer whose model saves/loads go through _model_save_owner()
        if trainer is not None:
            self.bind(trainer)

    # -- binding
    def bind(self, trainer=None, model=None, tokenizer=None) -> None:
        """Attach the engine to ``model`` (default: ``trainer.model``) with ``tokenizer`` (default: the trainer's
        ``processing_class``): check the artifact against the model, build the constraints, run their model surgery,
        hook the model; with a trainer, also route its logging and model saves through the constraints. Called by the
        integrations (the trainer events, the Axolotl plugin, the trainer mixin) and safe to call again: binding the
        model already bound is a no-op for the engine."""
        if trainer is None:
            trainer = self.trainer
        if model is None and trainer is not None:
            model = getattr(trainer, "model", None)
        if model is None:
            raise SafeguardRuntimeError("SafeguardCallback received no model from the Trainer; cannot attach")
        if trainer is not None:
            self.trainer = trainer
            tokenizer = tokenizer if tokenizer is not None else getattr(trainer, "processing_class", None)
        self._check_training(self.trainer, model)
        self.engine.setup(model, getattr(tokenizer, "tokenizer", tokenizer))
        self._model_save_owner()  # two constraints replacing the model save: fail before step 1
        if self.trainer is not None and not self._log_wrapped:
            self._wrap_log(self.trainer)
        if self.trainer is not None and self._save_wrapped_for is not self.trainer:
            self._wrap_save(self.trainer)
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

    def _check_training(self, trainer, model) -> None:
        """Each enabled constraint's ``check_training`` on the trainer's set-up (before any model surgery)."""
        setup = training_setup(trainer, model)
        for name, section in self.engine.config.constraint_configs().items():
            get_constraint(name).check_training(section, setup)

    # -- the trainer's own model saves and loads, for a constraint that owns them (Constraint.owns_model_save)
    def _model_save_owner(self):
        owners = [c for c in self.engine.constraints if c.owns_model_save]
        if len(owners) > 1:
            raise SafeguardRuntimeError(
                f"constraints {', '.join(c.name for c in owners)} each replace the trainer's model save "
                "(owns_model_save) and cannot share one: enable only one of them")
        return owners[0] if owners else None

    def _partitioned(self, trainer) -> bool:
        """Parameters sharded across ranks (DeepSpeed ZeRO-3, FSDP): the owner cannot read the model whole."""
        return bool(getattr(trainer, "is_fsdp_enabled", False)) or any(
            hasattr(p, "ds_id") for p in self.engine.model.parameters())

    def _wrap_save(self, trainer) -> None:
        """Route the trainer's model saves through the owning constraint's ``save_model`` and its loads through
        ``load_model``, the way ``_wrap_log`` wraps ``trainer.log``. ``Trainer._save`` is where ``save_model``,
        every checkpoint and ``push_to_hub`` write the model: the trainer's own ``_save`` still runs (tokenizer,
        ``training_args.bin``, rank checks), with the model's ``save_pretrained`` answered by the owner.
        ``_load_from_checkpoint`` (resume) and ``_load_best_model`` (``load_best_model_at_end``) restore a folder the
        owner wrote with ``load_model``; other folders (e.g. checkpoints of older versions) load as before."""
        original_save, original_load = trainer._save, trainer._load_from_checkpoint
        original_best = getattr(trainer, "_load_best_model", None)
        callback = self

        def usable_owner(folder, action):
            owner = callback._model_save_owner() if callback.engine.model is not None else None
            if owner is not None and callback._partitioned(trainer):
                if trainer.args.should_save:
                    callback.log.warning("safeguard: parameters are partitioned (DeepSpeed ZeRO-3 / FSDP): %s cannot "
                                         "%s %s; the trainer's own format is used, which lacks what %s adds to the "
                                         "model", owner.name, action, folder, owner.name)
                return None
            return owner

        def _save(output_dir=None, state_dict=None):
            folder = os.fspath(output_dir if output_dir is not None else trainer.args.output_dir)
            owner = usable_owner(folder, "write the model to")
            if owner is None:
                return original_save(output_dir, state_dict=state_dict)
            model, notes = callback.engine.model, []

            def save_pretrained(save_directory, *args: Any, is_main_process: bool = True, **kwargs: Any):
                if is_main_process:
                    notes.append(owner.save_model(model, save_directory))

            shadowed = {id(m): m for m in (trainer.model, unwrap_model(trainer.model), model) if m is not None}
            for m in shadowed.values():
                m.save_pretrained = save_pretrained  # instance attribute: the trainer's call lands here
            try:
                result = original_save(folder, state_dict=state_dict)
            finally:
                for m in shadowed.values():
                    delattr(m, "save_pretrained")
            if not notes and trainer.args.should_save:  # a _save that never called save_pretrained
                notes.append(owner.save_model(model, folder))
            if notes:
                callback.log.info("safeguard: %s wrote the trained model to %s%s", owner.name, folder,
                                  f"; {notes[0]}" if notes[0] else "")
            return result

        def _load_from_checkpoint(resume_from_checkpoint, model=None):
            owner = usable_owner(resume_from_checkpoint, "load the model from")
            if owner is not None and owner.load_model(callback.engine.model, resume_from_checkpoint):
                callback.log.info("safeguard: %s restored the model from %s", owner.name, resume_from_checkpoint)
                return None
            return original_load(resume_from_checkpoint, model)

        def _load_best_model():
            best = trainer.state.best_model_checkpoint
            owner = usable_owner(best, "load the model from")
            if owner is not None and owner.load_model(callback.engine.model, best):
                callback.log.info("safeguard: %s restored the best model from %s", owner.name, best)
                return None
            return original_best()

        def _save_with_card(output_dir=None, state_dict=None):
            result = _save(output_dir, state_dict=state_dict)
            callback.write_card(output_dir if output_dir is not None else trainer.args.output_dir)
            return result

        original_card = getattr(trainer, "create_model_card", None)

        def create_model_card(*args: Any, **kwargs: Any):  # TRL / push_to_hub rewrite output_dir/README.md whole
            result = original_card(*args, **kwargs)
            callback.write_card(trainer.args.output_dir)
            return result

        trainer._save, trainer._load_from_checkpoint = _save_with_card, _load_from_checkpoint
        if original_card is not None:
            trainer.create_model_card = create_model_card
        if original_best is not None:
            trainer._load_best_model = _load_best_model
        self._save_wrapped_for = trainer

    def write_card(self, folder) -> None:
        """The safety section of ``folder/README.md`` and ``folder/safeguard_run.json`` (:mod:`safeguard_plugin.record`)
        for the run so far; on the process that saves only. A failure is logged, never raised: the model is saved."""
        trainer = self.trainer
        if folder is None or (trainer is not None and not trainer.args.should_save):
            return
        try:
            write_model_card(folder, run_record(self.engine))
        except Exception as e:  # noqa: BLE001 -- the card is documentation; losing it must not lose the save
            self.log.warning("safeguard: could not write the model card section to %s: %s", folder, e)

    # -- events
    def on_init_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        self.bind(self.trainer or _find_trainer(self), model, processing_class)

    def on_train_begin(self, args, state, control, model=None, processing_class=None, train_dataloader=None, **kwargs):
        if self.trainer is None:
            self.trainer = _find_trainer(self)
        current = unwrap_model(self.trainer.model if self.trainer is not None else model)
        if self.engine.model is None or current is not self.engine.model:
            self.bind(self.trainer, current, processing_class)
        self.engine.begin_training(state.max_steps, args.gradient_accumulation_steps, state.global_step)
        if self.trainer is not None:  # fp16: the injected penalty gradient gets the scaler's current loss scale
            trainer = self.trainer
            self.engine.set_loss_scale(lambda: trainer_loss_scale(trainer))
        if state.global_step > 0:  # resuming: the weights are no longer the original ones
            ckpt = _resume_checkpoint(self) or os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
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
        """Write the model with the constraint that owns its save (``Constraint.owns_model_save``; GuardSpace: a
        standard PEFT adapter with the projector folded in, plus its own files) to ``folder``, for a caller that saves
        the model without the trainer's ``save_model`` (the Axolotl plugin); returns the folders written (none when no
        constraint owns the save). The trainer's own saves already go through the owner (``_wrap_save``)."""
        owner = self._model_save_owner() if self.engine.model is not None else None
        if owner is None:
            return []
        if self._partitioned(self.trainer):
            self.log.warning("safeguard: parameters are partitioned (DeepSpeed ZeRO-3 / FSDP): %s did NOT write the "
                             "model to %s", owner.name, folder)
            return []
        note = owner.save_model(self.engine.model, folder)
        self.log.info("safeguard: %s wrote the trained model to %s%s", owner.name, folder, f"; {note}" if note else "")
        return [os.fspath(folder)]

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.engine.save_state(os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self._log_wrapped and logs is not None and "loss" in logs:
            m = self.engine.metrics()
            logs.update(m)
            if state.log_history:
                state.log_history[-1].update(m)

    def on_train_end(self, args, state, control, **kwargs):
        # a run whose constraints never acted fails here, also when it ended before check_first_steps (Axolotl too)
        self.engine.end_training()


class SafeguardTrainerMixin:
    """Mixin for any transformers ``Trainer`` subclass: ``class T(SafeguardTrainerMixin, Trainer)``.

    Pass ``safeguard=<yaml path | dict | SafeguardConfig>``; the penalty is added to the loss returned by
    ``compute_loss`` (so the logged ``loss`` includes it).
    """

    def __init__(self, *args: Any, safeguard: str | dict | SafeguardConfig | None = None, **kwargs: Any):
        if safeguard is None:
            raise TypeError(f"{type(self).__name__} needs safeguard=<config path | dict | SafeguardConfig>")
        super().__init__(*args, **kwargs)
        self.safeguard = SafeguardCallback(safeguard, _mode="collect", trainer=self)  # binds to self.model now
        self.add_callback(self.safeguard)

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
