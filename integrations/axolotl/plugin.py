"""``SafeguardPlugin``: drives :class:`~safeguard_plugin.integrations.trl.SafeguardCallback` from Axolotl's hooks.

Nothing of Axolotl's trainer is replaced (no ``get_trainer_cls``): the callback attaches the engine in
``inject`` mode, which puts the penalty's gradient inside the model's forward, so AxolotlTrainer's own
``compute_loss`` (and any other plugin's trainer) keeps working. Hooks used, in Axolotl's order:

* ``register``          -- banner naming the active constraints (logger ``axolotl.integrations.safeguard``); with
  GuardSpace, Axolotl's fused LoRA kernels are switched off here, before Axolotl's config validation would turn
  them on (a YAML that sets them to true is refused, naming the keys).
* ``get_input_args``    -- the nested ``safeguard:`` block (``args.SafeguardArgs``, our one schema, plus a config-level
  check: GuardSpace needs ``adapter: lora|qlora`` and the fused kernels off).
* ``pre_model_load``    -- before the model is built: refuse 4/8-bit loading without CUDA (bitsandbytes), and
  fused LoRA kernels that are still on with GuardSpace.
* ``pre_lora_load``     -- seed the RNG so LoRA initialisation is reproducible (Axolotl does not); with GuardSpace,
  calibrate a missing artifact here (it needs the base model's Linear layers, before LoRA wraps them).
* ``post_model_load``   -- model fully set up: if the artifact folder is missing, calibrate it there from the
  original weights (adapters disabled). Not earlier: between ``post_model_build`` and LoRA loading Axolotl's
  attention may already be patched for its fused LoRA kernels and cannot run a forward.
* ``add_callbacks_post_trainer`` -- bind the callback to the trainer's final (PEFT-wrapped) model; it then
  precomputes reference values at train begin through Axolotl's dataloader/collator, scales the injected
  gradient by ``1/gradient_accumulation_steps``, runs after-step work in ``on_step_end``, adds its metrics to
  the trainer's normal step logs (``trainer.log``) and writes ``checkpoint-N/guardspace/`` with every checkpoint.
* ``post_train`` (Axolotl calls it twice: before and after its own model save) -- GuardSpace adapters are written
  into ``output_dir`` on both calls (same files; the second call replaces the adapter Axolotl saved, which lacks
  the projector); once: detach hooks, write ``safeguard_run.json`` to ``output_dir``.
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
from safeguard_plugin.integrations.trl import SafeguardCallback
from safeguard_plugin.modeling import is_peft_model

from .args import (
    FUSED_LORA_KERNELS,
    guardspace_kernel_conflicts,
    kernels_message,
    plain,
    uses_guardspace,
    validate_block,
)
from .guard import ENTRY_POINT_NAME, PLUGIN_PATH, guard_installed

LOG = logging.getLogger("axolotl.integrations.safeguard")

ARGS_PATH = "safeguard_plugin.integrations.axolotl.args.SafeguardArgs"
RUN_FILE = "safeguard_run.json"


def safeguard_block(cfg: Any) -> SafeguardConfig | None:
    """The validated ``safeguard:`` block of an Axolotl cfg (None when absent)."""
    block = cfg.get("safeguard") if cfg is not None else None
    return None if block is None else validate_block(plain(block))


def _artifact_ready(path: Path) -> bool:
    return (path / "manifest.json").is_file()


def ensure_artifact(cfg: Any, sg: SafeguardConfig, model: torch.nn.Module, tokenizer=None) -> Path | None:
    """Calibrate ``model`` into ``sg.artifact`` unless an artifact is already there. Returns the folder.

    Uses the original weights (PEFT adapters disabled). In a multi-process run rank 0 calibrates, the others wait.
    """
    if not sg.artifact:
        return None
    path = Path(sg.artifact)
    if _artifact_ready(path):
        LOG.info("safeguard: using artifact %s", path)
        return path
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"safeguard.artifact: {path} exists but holds no manifest.json (not an artifact); "
                              "point `artifact:` at an empty or missing folder to calibrate into it")
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        raise RuntimeError(f"safeguard.artifact: {path} is missing and the model is partitioned (DeepSpeed ZeRO-3), "
                           "so it cannot be calibrated inside the run; run `axolotl safeguard calibrate <yaml>` "
                           "without ZeRO-3 first")
    import torch.distributed as dist

    multi = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if not multi or dist.get_rank() == 0:
        from safeguard_plugin.calibration import calibrate
        from safeguard_plugin.data import load_prompts

        if tokenizer is None:
            from axolotl.loaders import load_tokenizer

            tokenizer = load_tokenizer(cfg)
        LOG.info("safeguard: artifact %s not found; calibrating %s on the shipped harmful/harmless prompt sets "
                 "(cached there for later runs)", path, cfg.get("base_model"))
        with model.disable_adapter() if is_peft_model(model) else contextlib.nullcontext():
            # only what this block uses (e.g. GuardSpace needs the base model before LoRA and is heavy)
            art = calibrate(model, tokenizer, load_prompts("harmful"), load_prompts("harmless"), path,
                            model_id=str(cfg.get("base_model")), constraints=list(sg.constraint_configs()),
                            constraint_configs=sg.constraint_configs(),  # e.g. guardspace max_prompts, null_energy
                            progress=True)
        LOG.info("safeguard: wrote artifact\n%s", art.summary())
    if multi:
        dist.barrier()
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


def switch_off_fused_kernels(cfg: Any) -> str:
    """GuardSpace: set Axolotl's fused LoRA kernel keys the YAML leaves unset to false (before Axolotl's validation
    turns them on); refuse keys set to true. Returns the banner line."""
    explicit = guardspace_kernel_conflicts(cfg)
    if explicit:
        raise ValueError(kernels_message(explicit))
    unset = [k for k in FUSED_LORA_KERNELS if cfg.get(k) is None]
    for k in unset:
        cfg[k] = False
    return (f"  guardspace: fused LoRA kernels {', '.join(FUSED_LORA_KERNELS)} off"
            + (f" (switched off by the plugin: {', '.join(unset)})" if unset else ""))


REENTRANT_MESSAGE = (
    "safeguard: `gradient_checkpointing` with `gradient_checkpointing_kwargs: {use_reentrant: true}` runs each decoder "
    "layer's forward without gradients, so the constraints would see no activations; set "
    "`gradient_checkpointing_kwargs: {use_reentrant: false}` (or leave gradient_checkpointing_kwargs unset: the "
    "plugin then picks non-reentrant checkpointing)")


def _reentrant(cfg: Any) -> bool:
    kwargs = cfg.get("gradient_checkpointing_kwargs") or {}
    return bool(kwargs.get("use_reentrant"))


def non_reentrant_checkpointing(cfg: Any) -> str:
    """Axolotl defaults ``gradient_checkpointing_kwargs`` to ``{use_reentrant: true}`` (in normalize_config, after
    this hook); with a ``safeguard:`` block choose non-reentrant instead when unset, refuse an explicit true."""
    kwargs = cfg.get("gradient_checkpointing_kwargs")
    if kwargs is not None and "use_reentrant" in kwargs:
        if kwargs["use_reentrant"]:
            raise ValueError(REENTRANT_MESSAGE)
        return "  gradient checkpointing: non-reentrant"
    cfg["gradient_checkpointing_kwargs"] = {**plain(kwargs or {}), "use_reentrant": False}
    return "  gradient checkpointing: non-reentrant (use_reentrant: false set by the plugin; Axolotl's default is true)"


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
        if block is not None and uses_guardspace(block):
            lines.append(switch_off_fused_kernels(cfg))
        if block is not None and cfg.get("gradient_checkpointing"):
            lines.append(non_reentrant_checkpointing(cfg))
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
            raise ValueError(
                f"safeguard: this config loads the base model quantized ({keys}), which needs bitsandbytes and a CUDA "
                "GPU; no CUDA device is visible here. Run it on a GPU machine, or, to try it on CPU, set "
                "`adapter: lora` and `load_in_4bit: false` / `load_in_8bit: false`."
            )
        if "guardspace" in sg.constraint_configs():
            on = guardspace_kernel_conflicts(cfg)
            if on:  # too late to switch off: Axolotl patched the attention class before this hook
                raise ValueError(kernels_message(on))
        # gradient checkpointing works non-reentrant: the layer hooks only store activations (recomputation
        # re-stores the same values) and the penalty is attached at the final norm, outside every checkpointed layer
        if cfg.get("gradient_checkpointing") and _reentrant(cfg):
            raise ValueError(REENTRANT_MESSAGE)

    def pre_lora_load(self, cfg, model):
        # Axolotl does not seed adapter initialisation; without this two identical LoRA runs differ.
        seed = int(cfg.get("seed")) if cfg.get("seed") is not None else 42
        torch.manual_seed(seed)
        sg = safeguard_block(cfg)
        if sg is not None and "guardspace" in sg.constraint_configs():
            # GuardSpace calibrates on the base model's own Linear layers, before Axolotl wraps them in LoRA; the
            # fused kernels that would make this forward fail here are off with GuardSpace (see register)
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
        callback = SafeguardCallback(sg)
        callback.log = LOG  # Axolotl shows INFO only for `axolotl.*` loggers
        callback.save_adapters_at_train_end = False  # post_train writes them into output_dir itself
        # bind now, not at train begin: artifact/model mismatches fail before any step, and the engine hooks the
        # very model object the trainer will call (PEFT-wrapped under LoRA)
        callback._bind(trainer, trainer.model, getattr(trainer, "processing_class", None))
        model = callback.engine.model
        LOG.info("safeguard: attached to %s training %s%s; gradient accumulation %s handled by the engine",
                 type(trainer).__name__, type(model).__name__, " (PEFT adapters)" if is_peft_model(model) else "",
                 trainer.args.gradient_accumulation_steps)
        self.callback, self._finished = callback, False
        return [callback]

    def post_train(self, cfg, model):
        if self.callback is None:
            return
        trainer = self.callback.trainer
        out_dir = cfg.get("output_dir")
        main = trainer is None or trainer.is_world_process_zero()
        if out_dir and main:
            # both calls: the second comes after Axolotl's own save, whose adapter_model.safetensors lacks
            # GuardSpace's projector and residual; save_guardspace's export (identical outputs) replaces it
            if self._finished and self._adapter_dirs:
                LOG.info("safeguard: writing the GuardSpace adapter over the one Axolotl saved (it lacks the projector)")
            self._adapter_dirs = self.callback.save_adapters(out_dir) or self._adapter_dirs
        if self._finished:
            return
        self._finished = True
        engine = self.callback.engine
        history = [dict(h) for h in getattr(getattr(trainer, "state", None), "log_history", [])
                   if any(str(k).startswith("safeguard/") for k in h)]
        summary = {
            "safeguard_plugin": __version__,
            "banner": engine.banner(),
            "config": json.loads(engine.config.model_dump_json()),
            "artifact": str(engine.artifact.path) if engine.artifact is not None else None,
            "optimizer_steps": engine.optimizer_steps_seen,
            "position_coverage": engine.n_rows_found / engine.n_rows if engine.n_rows else None,
            "nan_skipped": engine.nan_skipped,
            "stop_reason": engine.stop_reason,
            "adapters": self._adapter_dirs,
            "log_history": history,
        }
        engine.detach()
        if out_dir and main:
            os.makedirs(out_dir, exist_ok=True)
            path = Path(out_dir) / RUN_FILE
            path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
            LOG.info("safeguard: %d optimizer steps with %s; summary in %s", summary["optimizer_steps"],
                     ", ".join(c.name for c in engine.constraints), path)
