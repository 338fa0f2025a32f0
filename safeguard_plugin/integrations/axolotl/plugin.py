"""``SafeguardPlugin``: drives :class:`~safeguard_plugin.integrations.trl.SafeguardCallback` from Axolotl's hooks.

Nothing of Axolotl's trainer is replaced (no ``get_trainer_cls``): the callback attaches the engine in
``inject`` mode, which puts the penalty's gradient inside the model's forward, so AxolotlTrainer's own
``compute_loss`` (and any other plugin's trainer) keeps working. Hooks used, in Axolotl's order:

The plugin knows no constraint by name: what a constraint needs from the run is declared on its class
(``Constraint`` capability flags and ``check_training``, see :mod:`safeguard_plugin.constraints.base`) and read here.

* ``register``          -- banner naming the active constraints (logger ``axolotl.integrations.safeguard``); with a
  constraint that ``requires_unfused_lora``, Axolotl's fused LoRA kernels are switched off here, before Axolotl's
  config validation would turn them on (a YAML that sets them to true is refused, naming the keys). DeepSpeed without
  CUDA: opens the gloo process group Axolotl would open with NCCL right after this hook (1 process; several are
  refused with the reasons).
* ``get_input_args``    -- the nested ``safeguard:`` block (``args.SafeguardArgs``, our one schema, plus config-level
  checks: ``requires_lora_adapter`` needs ``adapter: lora|qlora``, ``requires_unfused_lora`` the fused kernels off,
  and each constraint's ``check_training``).
* ``pre_model_load``    -- before the model is built: refuse 4/8-bit loading without CUDA (bitsandbytes) and
  fused LoRA kernels that are still on with a constraint that ``requires_unfused_lora``. fp16 works: the callback
  multiplies the injected penalty gradient by the trainer's current loss scale (``safeguard_plugin.precision``).
* ``pre_lora_load``     -- seed torch's RNG with the YAML's ``seed:`` (default 42) for the LoRA initialisation that
  follows (Axolotl 0.19 does not, and torch 2.13 starts every process from a random seed: see ``LORA_SEED_LINE``,
  shown in the banner), with or without a ``safeguard:`` block; with a constraint that ``calibrates_base_layers``,
  calibrate a missing artifact here (the base model's Linear layers, before LoRA wraps them), on a forked RNG.
* ``post_model_load``   -- model fully set up: if the artifact folder is missing, calibrate it there from the
  original weights (adapters disabled); under several processes once, on rank 0 (see ``ensure_artifact``). Not earlier: between ``post_model_build`` and LoRA loading Axolotl's
  attention may already be patched for its fused LoRA kernels and cannot run a forward.
* ``add_callbacks_post_trainer`` -- bind the callback to the trainer's final (PEFT-wrapped) model; it then
  precomputes reference values at train begin through Axolotl's dataloader/collator, scales the injected
  gradient by ``1/gradient_accumulation_steps`` and the trainer's fp16 loss scale, runs after-step work in ``on_step_end``, adds its metrics to
  the trainer's normal step logs (``trainer.log``); the trainer's own saves (every ``checkpoint-N``) write what a
  constraint that ``owns_model_save`` adds (e.g. GuardSpace: a standard PEFT adapter with the projector folded in).
* ``post_train`` (Axolotl calls it twice: before and after its own model save) -- with a constraint that
  ``owns_model_save``, the trained model is written into ``output_dir`` on both calls, in the layout of every
  ``checkpoint-N`` (``Constraint.save_model``; e.g. GuardSpace: a standard PEFT adapter with the projector folded in
  plus its own files), directly in the folder (same files both times; the second call replaces what Axolotl's own
  ``model.save_pretrained`` wrote, which lacks what the constraint adds); once: detach hooks, write
  ``safeguard_run.json`` (the run record of :mod:`safeguard_plugin.record`) and the model card's "Safety fine-tuning"
  section (``README.md``) to ``output_dir``; the second call merges the section again (Axolotl's save may rewrite the
  card).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from axolotl.integrations.base import BasePlugin

from safeguard_plugin import __version__
from safeguard_plugin.config import SafeguardConfig
from safeguard_plugin.distributed import (
    broadcast_object,
    is_distributed,
    is_main_process,
    main_process_first,
    sync_folder,
    world_size,
    zero3_active,
)
from safeguard_plugin.integrations.trl import SafeguardCallback
from safeguard_plugin.modeling import is_peft_model
from safeguard_plugin.record import RUN_FILE, run_record, write_model_card

from ...errors import ConfigError, SafeguardRuntimeError
from .args import (
    FUSED_LORA_KERNELS,
    constraints_with,
    fused_kernel_conflicts,
    kernels_message,
    plain,
    validate_block,
)
from .guard import ENTRY_POINT_NAME, PLUGIN_PATH, guard_installed, offline_telemetry_off

LOG = logging.getLogger("axolotl.integrations.safeguard")

ARGS_PATH = "safeguard_plugin.integrations.axolotl.args.SafeguardArgs"


def safeguard_block(cfg: Any) -> SafeguardConfig | None:
    """The validated ``safeguard:`` block of an Axolotl cfg (None when absent)."""
    block = cfg.get("safeguard") if cfg is not None else None
    return None if block is None else validate_block(plain(block))


def _artifact_ready(path: Path, sg: SafeguardConfig | None = None) -> bool:
    """An artifact is there and was calibrated for every constraint the block enables (else the missing ones are
    added to it at start-up, reusing what it holds)."""
    if not (path / "manifest.json").is_file():
        return False
    if sg is None:
        return True
    try:
        done = json.loads((path / "manifest.json").read_text()).get("calibrated_for") or []
    except (OSError, ValueError, AttributeError):
        return True  # let Artifact.load report what is wrong with it
    return set(sg.constraint_configs()) <= set(done)


ZERO3_MESSAGE = (
    "safeguard.artifact: {path} is missing and the model is partitioned (DeepSpeed ZeRO-3), so it cannot be "
    "calibrated inside the run; compute it first with `axolotl safeguard calibrate <this yaml>` (it loads the model "
    "without DeepSpeed), then launch the run again")


def _calibrates_base_layers(sg: SafeguardConfig) -> bool:
    """Some enabled constraint calibrates on the plain Linear layers (``Constraint.calibrates_base_layers``)."""
    return bool(constraints_with(sg, "calibrates_base_layers"))


@contextlib.contextmanager
def user_rng_untouched():
    """Run calibration without moving the run's random state (torch CPU and CUDA, Python, NumPy): in
    ``pre_lora_load`` the LoRA initialisation draws from it next, and a run that calibrates its artifact must start
    from the adapter a run that finds it (or has no `safeguard:` block) starts from."""
    import random
    import sys

    np = sys.modules.get("numpy")
    py_state, np_state = random.getstate(), np.random.get_state() if np is not None else None
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        if np_state is not None:
            np.random.set_state(np_state)


LORA_SEED_LINE = (
    "  LoRA init: torch seeded with {seed} ({source}) just before Axolotl creates the adapters, with or without "
    "a `safeguard:` block. Axolotl 0.19 seeds only at trainer set-up, after them, and torch starts each process from "
    "a random seed: without the plugin two runs of one YAML start from different adapters. To compare with and "
    "without constraints, keep the plugin and remove the `safeguard:` block.")


def lora_seed(cfg: Any) -> int:
    return int(cfg.get("seed")) if cfg.get("seed") is not None else 42  # the Trainer's default seed


def _calibrate(cfg: Any, sg: SafeguardConfig, model: torch.nn.Module, tokenizer, path: Path) -> None:
    from safeguard_plugin.artifacts import artifact_entries, check_target

    check_target(path.resolve(), artifact_entries, "artifact")  # an artifact (extended) or an empty/missing folder
    from safeguard_plugin.calibration import calibrate
    from safeguard_plugin.data import load_prompts

    LOG.info("safeguard: artifact %s not found; calibrating %s on the shipped harmful/harmless prompt sets "
             "(cached there for later runs)%s", path, cfg.get("base_model"),
             f"; rank 0 of {world_size()} computes it, the other ranks wait" if is_distributed() else "")
    with user_rng_untouched(), model.disable_adapter() if is_peft_model(model) else contextlib.nullcontext():
        # only what this block uses (some constraints need the base model before LoRA and are heavy)
        art = calibrate(model, tokenizer, load_prompts("harmful"), load_prompts("harmless"), path,
                        model_id=str(cfg.get("base_model")), constraints=list(sg.constraint_configs()),
                        constraint_configs=sg.constraint_configs(),  # the sections' calibration options
                        progress=True)
    LOG.info("safeguard: wrote artifact\n%s", art.summary())


def ensure_artifact(cfg: Any, sg: SafeguardConfig, model: torch.nn.Module, tokenizer=None) -> Path | None:
    """Calibrate ``model`` into ``sg.artifact`` unless an artifact is already there. Returns the folder.

    Uses the original weights (PEFT adapters disabled). Under a multi-process launch (torchrun, accelerate,
    deepspeed; one node or several) it runs once: rank 0 decides (does *its* folder hold an artifact?) and
    calibrates while the other ranks wait (:func:`main_process_first`); then ranks that do not see the folder
    (other nodes, no shared filesystem) receive rank 0's copy (:func:`sync_folder`). A failure on rank 0 is raised
    on every rank, so no rank is left waiting. Collective: call it on every rank.
    """
    if not sg.artifact:
        return None
    path = Path(sg.artifact)
    multi = is_distributed()
    ready = _artifact_ready(path, sg)
    if multi:
        ready = bool(broadcast_object(ready))  # rank 0's view decides, the same on every rank
    if ready:
        LOG.info("safeguard: using artifact %s", path)
        if multi:
            sync_folder(path)
        return path
    if zero3_active(model):  # the same on every rank: all raise
        raise SafeguardRuntimeError(ZERO3_MESSAGE.format(path=path))
    if tokenizer is None:  # on every rank: Axolotl's load_tokenizer may hold a barrier
        from axolotl.loaders import load_tokenizer

        tokenizer = load_tokenizer(cfg)
    error: BaseException | None = None
    with main_process_first() as first:
        if first:
            try:
                _calibrate(cfg, sg, model, tokenizer, path)
            except Exception as exc:  # re-raised below, after the other ranks have been told
                error = exc
    if multi:
        failed = broadcast_object(None if error is None else f"{type(error).__name__}: {error}")
        if failed is not None and error is None:
            raise SafeguardRuntimeError(f"safeguard: calibrating {path} failed on rank 0: {failed}")
    if error is not None:
        raise error
    if multi:
        sync_folder(path)
    return path


def _describe(sg: SafeguardConfig) -> list[str]:
    lines = []
    for name, c in sg.constraint_configs().items():
        opts = ", ".join(f"{k}={v}" for k, v in c.model_dump().items() if k != "enabled")
        lines.append(f"  constraint {name}: {opts}")
    art = Path(sg.artifact) if sg.artifact else None
    state = "none" if art is None else (f"{art}" if _artifact_ready(art) else f"{art} (missing: calibrated when the "
                                                                               "model has loaded)")
    lines.append(f"  artifact: {state}")
    return lines


def switch_off_fused_kernels(cfg: Any, names: list[str]) -> str:
    """Constraints ``names`` act in the LoRA modules' forward (``requires_unfused_lora``): set Axolotl's fused LoRA
    kernel keys the YAML leaves unset to false (before Axolotl's validation turns them on); refuse keys set to true.
    Returns the banner line."""
    explicit = fused_kernel_conflicts(cfg)
    if explicit:
        raise ConfigError(kernels_message(explicit, names))
    unset = [k for k in FUSED_LORA_KERNELS if cfg.get(k) is None]
    for k in unset:
        cfg[k] = False
    return (f"  {', '.join(names)}: fused LoRA kernels {', '.join(FUSED_LORA_KERNELS)} off"
            + (f" (switched off by the plugin: {', '.join(unset)})" if unset else ""))


AXOLOTL_DATA_FORMAT_HINT = (
    "In the Axolotl YAML, render the examples with the chat template the artifact was calibrated with: give each "
    "dataset `type: chat_template` (with `field_messages:` naming its conversation column), not a `completion` / "
    "`alpaca`-style type, and set `chat_template: tokenizer_default` (or the template used at calibration); or point "
    "`safeguard.artifact:` to a new folder so the plugin calibrates it with this run's tokenizer at start-up.")


REENTRANT_MESSAGE = (
    "safeguard: `gradient_checkpointing` with `gradient_checkpointing_kwargs: {use_reentrant: true}` runs each decoder "
    "layer's forward without gradients, so the constraints would see no activations; set "
    "`gradient_checkpointing_kwargs: {use_reentrant: false}` (or leave gradient_checkpointing_kwargs unset: the "
    "plugin then picks non-reentrant checkpointing)")


CPU_MULTI_PROCESS_MESSAGE = (
    "safeguard: DeepSpeed without CUDA with {world} processes: through Axolotl 0.19 this runs as 1 process only "
    "(`--launcher python`). Measured here with 2 processes (torchrun, gloo): accelerate finds no backend for "
    "DeepSpeed on CPU and counts 1 process (DeepSpeed's train_batch_size check fails); with that worked around, "
    "ZeRO-2 fails in DeepSpeed 0.18.9's step ('Output 0 of Split is a view and is being modified inplace', fixed "
    "in DeepSpeed >= 0.19, which Axolotl 0.19 does not accept) and ZeRO-3 trains but saves a broken adapter "
    "(partitioned tensors of shape (0,)). On GPUs none of this applies. For a multi-process CPU test use the TRL "
    "path (tests/test_deepspeed.py).")


def open_cpu_process_group(cfg: Any) -> str | None:
    """DeepSpeed without CUDA: open a gloo process group before Axolotl's set-up. Returns the banner line (None: no-op).

    Axolotl 0.19 (``prepare_optim_env`` -> ``setup_deepspeed_env``, right after the plugins' ``register``) opens
    DeepSpeed's process group itself with ``dist_backend="nccl"`` when ``WORLD_SIZE`` is 1, which fails without
    CUDA. DeepSpeed's ``init_distributed`` adopts a torch process group that already exists, so opening a gloo
    group first makes the same YAML run on CPU (1 process; several are refused, see ``CPU_MULTI_PROCESS_MESSAGE``).
    """
    if not cfg.get("deepspeed") or torch.cuda.is_available():
        return None
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        return None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise ConfigError(CPU_MULTI_PROCESS_MESSAGE.format(world=world))
    for k in ("RANK", "LOCAL_RANK"):
        os.environ.setdefault(k, "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # in-process: no port to pick
    return "  deepspeed without CUDA: gloo process group opened (1 process; Axolotl would ask for NCCL)"


def _reentrant(cfg: Any) -> bool:
    kwargs = cfg.get("gradient_checkpointing_kwargs") or {}
    return bool(kwargs.get("use_reentrant"))


def non_reentrant_checkpointing(cfg: Any) -> str:
    """Axolotl defaults ``gradient_checkpointing_kwargs`` to ``{use_reentrant: true}`` (in normalize_config, after
    this hook); with a ``safeguard:`` block choose non-reentrant instead when unset, refuse an explicit true."""
    kwargs = cfg.get("gradient_checkpointing_kwargs")
    if kwargs is not None and "use_reentrant" in kwargs:
        if kwargs["use_reentrant"]:
            raise ConfigError(REENTRANT_MESSAGE)
        return "  gradient checkpointing: non-reentrant"
    cfg["gradient_checkpointing_kwargs"] = {**plain(kwargs or {}), "use_reentrant": False}
    return "  gradient checkpointing: non-reentrant (use_reentrant: false set by the plugin; Axolotl's default is true)"


def _zero_stage(trainer: Any) -> int | None:
    """The DeepSpeed ZeRO stage the trainer runs under (None without DeepSpeed)."""
    if trainer is None or not getattr(trainer, "is_deepspeed_enabled", False):
        return None
    plugin = getattr(getattr(getattr(trainer, "accelerator", None), "state", None), "deepspeed_plugin", None)
    return getattr(plugin, "zero_stage", None)


@contextlib.contextmanager
def _model_bound(engine: Any, model: torch.nn.Module | None):
    """``engine.model`` is ``model`` while the block runs, when the engine was detached since (post_train's second
    call, after Axolotl's own save: ``SafeguardCallback.save_adapters`` writes nothing for a detached engine)."""
    if model is None or getattr(engine, "model", None) is not None:
        yield
        return
    engine.model = model  # read by save_adapters only: the hooks stay removed
    try:
        yield
    finally:
        engine.model = None


def _deepspeed_note(trainer: Any) -> str:
    stage = _zero_stage(trainer)
    if stage is None:
        return ""
    import torch.distributed as dist

    backend = dist.get_backend() if dist.is_available() and dist.is_initialized() else "?"
    return f"; DeepSpeed ZeRO-{stage}, {world_size()} process{'es' if world_size() > 1 else ''} ({backend})"


class SafeguardPlugin(BasePlugin):
    """Axolotl plugin for safeguard-plugin constraints. YAML::

        plugins:
          - safeguard_plugin.integrations.axolotl.SafeguardPlugin
        safeguard:
          artifact: ./safeguard-artifacts/my-model
          procon: {weight: 100.0}
    """

    def __init__(self):
        super().__init__()
        self.callback: SafeguardCallback | None = None
        self._finished = False
        self._adapter_dirs: list[str] = []
        self._trained_model: torch.nn.Module | None = None  # the engine's model, kept for post_train's second save
        self._record: dict[str, Any] | None = None  # the run record (safeguard_run.json), for the second call's card

    # ------------------------------------------------------------------------------------- config
    def get_input_args(self) -> str:
        return ARGS_PATH

    def register(self, cfg: dict):
        rule = "=" * 30
        lines = [f"{rule} safeguard {rule}", f"safeguard-plugin {__version__}: Axolotl plugin {PLUGIN_PATH} is active"]
        block = cfg.get("safeguard") if cfg is not None else None
        if block is None:
            lines.append("  no `safeguard:` block in this config: training runs WITHOUT safety constraints")
        else:
            try:
                lines += _describe(validate_block(plain(block)))
            except ValueError:  # reported with the key's name when Axolotl validates the config
                lines.append(f"  safeguard: {dict(plain(block))} (invalid; see the validation error)")
        if block is not None and (unfused := constraints_with(block, "requires_unfused_lora")):
            lines.append(switch_off_fused_kernels(cfg, unfused))
        if block is not None and cfg.get("gradient_checkpointing"):
            lines.append(non_reentrant_checkpointing(cfg))
        if (line := open_cpu_process_group(cfg)) is not None:
            lines.append(line)
        if cfg is not None and cfg.get("adapter"):
            lines.append(LORA_SEED_LINE.format(seed=lora_seed(cfg), source="the YAML's `seed:`" if cfg.get("seed")
                                               is not None else "`seed:` unset: the Trainer's default"))
        if (line := offline_telemetry_off()) is not None:  # normally done by the guard already (see guard.py)
            lines.append(line)
            if "WARNING" in line:
                LOG.warning(line.strip())
        if guard_installed() is False:
            lines.append(f"  WARNING: the pydantic entry point '{ENTRY_POINT_NAME}' is not installed (or disabled by "
                         "PYDANTIC_DISABLE_PLUGINS): a `safeguard:` block in a run where this plugin fails to load "
                         "would be ignored silently. Reinstall safeguard-plugin.")
        lines.append("=" * len(lines[0]))
        LOG.info("\n".join(lines))

    # ------------------------------------------------------------------------------------- model
    def pre_model_load(self, cfg):
        sg = safeguard_block(cfg)
        if sg is None:
            return
        quantized = [k for k in ("load_in_4bit", "load_in_8bit") if cfg.get(k)]
        if (quantized or cfg.get("adapter") == "qlora") and not torch.cuda.is_available():
            keys = ", ".join(f"{k}: true" for k in quantized) or "adapter: qlora"
            raise ConfigError(
                f"safeguard: this config loads the base model quantized ({keys}), which needs bitsandbytes and a CUDA "
                "GPU; no CUDA device is visible here. Run it on a GPU machine, or, to try it on CPU, set "
                "`adapter: lora` and `load_in_4bit: false` / `load_in_8bit: false`."
            )
        unfused = constraints_with(sg, "requires_unfused_lora")
        on = fused_kernel_conflicts(cfg) if unfused else []
        if on:  # too late to switch off: Axolotl patched the attention class before this hook
            raise ConfigError(kernels_message(on, unfused))
        # gradient checkpointing works non-reentrant: the layer hooks only store activations (recomputation
        # re-stores the same values) and the penalty is attached at the final norm, outside every checkpointed layer
        if cfg.get("gradient_checkpointing") and _reentrant(cfg):
            raise ConfigError(REENTRANT_MESSAGE)

    def pre_lora_load(self, cfg, model):
        # LoRA initialisation draws from torch's RNG right after this hook, and Axolotl 0.19 seeds nothing before it
        # (see LORA_SEED_LINE): seed it from the YAML's `seed:`, with or without a `safeguard:` block, and logged in
        # the banner. Calibration below runs on a forked RNG, so a run that calibrates starts from the same adapter
        # as one that finds the artifact.
        torch.manual_seed(lora_seed(cfg))
        sg = safeguard_block(cfg)
        if sg is not None and _calibrates_base_layers(sg):
            # calibration on the base model's own Linear layers, before Axolotl wraps them in LoRA; the fused kernels
            # that would make this forward fail here are off for constraints that act in the LoRA forward (register)
            ensure_artifact(cfg, sg, model)

    def post_model_load(self, cfg, model):
        sg = safeguard_block(cfg)
        if sg is not None:
            ensure_artifact(cfg, sg, model)

    # ------------------------------------------------------------------------------------- trainer
    def add_callbacks_post_trainer(self, cfg, trainer) -> list:
        sg = safeguard_block(cfg)
        if sg is None:
            return []
        if self.callback is not None and self.callback.trainer is trainer:
            return []  # already attached to this trainer
        # bound now (trainer=), not at train begin: artifact/model mismatches fail before any step, and the engine
        # hooks the very model object the trainer will call (PEFT-wrapped under LoRA)
        callback = SafeguardCallback(sg, trainer=trainer)
        callback.log = LOG  # Axolotl shows INFO only for `axolotl.*` loggers
        callback.engine.data_format_hint = AXOLOTL_DATA_FORMAT_HINT  # what to change in the YAML, not a TRL script
        model = callback.engine.model
        LOG.info("safeguard: attached to %s training %s%s; gradient accumulation %s handled by the engine%s",
                 type(trainer).__name__, type(model).__name__, " (PEFT adapters)" if is_peft_model(model) else "",
                 trainer.args.gradient_accumulation_steps, _deepspeed_note(trainer))
        self.callback, self._finished, self._trained_model = callback, False, None
        return [callback]

    def post_train(self, cfg, model):
        if self.callback is None:
            return
        trainer = self.callback.trainer
        out_dir = cfg.get("output_dir")
        main = is_main_process() and (trainer is None or trainer.is_world_process_zero())
        engine = self.callback.engine
        if out_dir and main:
            # both calls: the second comes after Axolotl's own save (model.save_pretrained, not the trainer's _save),
            # which lacks what the constraint that owns the model save adds; the owner's save (the checkpoints' layout,
            # identical outputs) replaces it. The first call detached the engine: the second re-binds the trained
            # model for the save.
            if self._finished and self._adapter_dirs:
                LOG.info("safeguard: writing the trained model over the one Axolotl saved (it lacks what the constraint "
                         "that owns the model save adds)")
            with _model_bound(engine, self._trained_model):
                self._adapter_dirs = self.callback.save_adapters(out_dir) or self._adapter_dirs
        if self._finished:
            if out_dir and main and self._record is not None:
                # Axolotl's own final save ran in between, through the trainer's save: put this run's full record
                # (with the Axolotl-side keys) and its card section back, unchanged
                write_model_card(out_dir, self._record)
            return
        self._finished = True
        self._trained_model = getattr(engine, "model", None)
        wrapped = type(getattr(trainer, "model_wrapped", None)).__name__ if trainer is not None else None
        history = [dict(h) for h in getattr(getattr(trainer, "state", None), "log_history", [])
                   if any(str(k).startswith("safeguard/") for k in h)]
        summary = run_record(engine, extra={
            "banner": engine.banner(),
            "config": json.loads(engine.config.model_dump_json()),
            "model_wrapped": wrapped,  # DeepSpeedEngine under DeepSpeed
            "deepspeed_zero_stage": _zero_stage(trainer),
            "world_size": world_size(),
            "stop_reason": engine.stop_reason,
            "adapters": self._adapter_dirs,
            "log_history": history,
        })
        self._record = summary
        engine.detach()
        if out_dir and main:
            path = write_model_card(out_dir, summary).with_name(RUN_FILE)
            LOG.info("safeguard: %d optimizer steps with %s (model trained as %s, %d process%s); summary in %s",
                     summary["optimizer_steps"], ", ".join(c.name for c in engine.constraints), wrapped,
                     summary["world_size"], "es" if summary["world_size"] > 1 else "", path)
