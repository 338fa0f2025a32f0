"""The constraint interface: the moments of a training run a method may act in.

| moment          | when                                        | method                                      |
|-----------------|---------------------------------------------|---------------------------------------------|
| calibrate       | offline, once per model                     | ``calibrate(ctx)`` adds components          |
| surgery         | engine.setup, before the optimizer exists   | ``modify_model``                            |
| prepare         | model exists, before the first step         | ``validate_model``, ``prepare``             |
| reference       | once per distinct prompt, original weights  | ``reference_values(acts)`` (cached)         |
| precompute      | once, over the training data, before step 1 | ``precompute(ctx, batches)`` (cached)       |
| penalty         | every training micro-batch forward          | ``penalty(batch)`` -> scalar tensor         |
| after_step      | after each optimizer step                   | ``after_step(ctx)``                         |
| metrics         | at each logging step                        | ``metrics()``                               |
| save / load     | the trainer's model saves, resume           | ``save_model``, ``load_model`` (opt-in)     |

The engine owns hooks, caching, gradient-accumulation scaling, NaN guarding and logging; a constraint
only does its maths.

Capabilities a constraint can ask for (class attributes), all off by default:

* ``layers()``: decoder-layer outputs at the post-instruction positions (``BatchView.acts``).
* ``uses_reference``: original-model values are needed, so integrations run the engine's pre-training pass
  (``engine.precompute_references``) and refuse set-ups where the original weights are gone (resuming full
  fine-tuning without saved state, streaming data under full fine-tuning). With ``prompt_reference`` (the
  default) the engine caches ``reference_values(acts)`` per prompt prefix into ``BatchView.reference``;
  constraints that get their reference another way (``precompute``, ``BatchView.reference_hidden``) set
  ``prompt_reference = False``.
* ``uses_final_hidden``: the penalty is computed at the final hidden states (the output of the model's final
  norm, the LM head's input), with the trainer's labels: ``BatchView.hidden``, ``labels``,
  ``next_token_targets()``, ``head`` (logits for chosen positions only) and ``reference_hidden()`` (a no-grad
  forward of the original weights on this batch, run only when the constraint asks for it).
* ``owns_model_save``: a plain ``save_pretrained`` of the model this constraint modified would be another model (e.g.
  GuardSpace: the projector and the residual weights would be lost), so the integrations route the trainer's own
  model saves (``save_model``, checkpoints, ``push_to_hub``) through ``save_model(model, folder)`` and its loads
  (resuming, best model) through ``load_model(model, folder)``. At most one active constraint may own the save.
* ``calibrates_base_layers``: ``calibrate`` reads the base model's own Linear layers, so integrations run it before
  PEFT wraps them (Axolotl: ``pre_lora_load``).
* ``requires_lora_adapter``: the method works on the run's LoRA adapters (re-initialises or constrains them), so the
  trainer must train a LoRA / QLoRA adapter (Axolotl: ``adapter: lora|qlora`` is required).
* ``requires_unfused_lora``: the method acts inside the LoRA modules' own forward, so fused LoRA kernels that compute
  the adapted projections without calling it must be off (Axolotl: ``lora_qkv_kernel`` / ``lora_o_kernel`` /
  ``lora_mlp_kernel`` are switched off).

Anything else a method needs from the trainer's set-up it checks in ``check_training(config, setup)``, which the
integrations call with a :class:`TrainingSetup` before the model is built (Axolotl) or when they attach (TRL).

What a constraint sees of the run is :class:`Runtime` (``TrainContext.runtime``, ``BatchView.runtime``): a small
protocol the engine implements; a constraint never imports the engine. Calibration sees
:class:`CalibrationContext`.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from ..config import python_form
from ..errors import ConfigError, SafeguardRuntimeError

if TYPE_CHECKING:
    from ..artifacts import Artifact
    from ..data import PromptSet


# The largest effective penalty weight (after every multiplier a constraint applies, e.g. ProCon's warm-up factor).
# Gradient norms square the gradient entries, and float32 overflows at ~3.4e38 (its square root is ~1.8e19): a weight
# of 1e30 gave an inf grad norm at step 2. 1e12 leaves 1e7 of headroom for the penalty's own gradient per unit weight;
# useful weights are 1-1000.
MAX_PENALTY_WEIGHT = 1e12


def check_effective_weight(what: str, value: float) -> float:
    """Raise (naming ``what``) when an effective penalty weight is not finite or would overflow float32 gradients."""
    if not math.isfinite(value) or value > MAX_PENALTY_WEIGHT:
        name = f"{what} = " if what else ""
        raise ConfigError(f"{name}{value:g} is too large: penalty weights above {MAX_PENALTY_WEIGHT:g} overflow float32 "
                         "gradients (inf grad norm); typical weights are 1-1000")
    return value


def _penalty_weight(value: float) -> float:
    return check_effective_weight("", value)


# A penalty weight λ: a finite number in [0, MAX_PENALTY_WEIGHT] (ints are fine; strings and booleans are not).
PenaltyWeight = Annotated[float, Field(ge=0, allow_inf_nan=False), AfterValidator(_penalty_weight)]


class CalibrationOptions(BaseModel):
    """Base for a constraint's ``calibration:`` block: options only ``safeguard calibrate`` (and in-run calibration)
    reads, so changing them needs a new artifact. Same strict rules as :class:`ConstraintConfig`; a method's config
    declares ``calibration: <its subclass> = Field(default_factory=<its subclass>, ...)``."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _python_forms(cls, data: Any) -> Any:
        return {k: python_form(v) for k, v in data.items()} if isinstance(data, dict) else data


class ConstraintConfig(BaseModel):
    """Base for every constraint's config section; unknown keys are errors.

    Strict types: numbers must be numbers (an int is fine for a float field; ``"1e3"`` and ``true`` are not),
    booleans must be booleans (not ``"no"`` or ``1``), and every float must be finite (no ``.inf`` / ``.nan``).
    From Python, a tuple is accepted for a list, an ``os.PathLike`` for a string and a NumPy number for a number.
    """

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    enabled: bool = Field(True, description="Set false to keep the section but switch the constraint off.")

    # the registry name of the constraint that uses this config (set by the Constraint subclass), for messages
    section_name: ClassVar[str | None] = None

    @model_validator(mode="before")
    @classmethod
    def _python_forms(cls, data: Any) -> Any:
        return {k: python_form(v) for k, v in data.items()} if isinstance(data, dict) else data

    @model_validator(mode="before")
    @classmethod
    def _nest_calibration(cls, data: Any) -> Any:
        """Calibration-only options given at the top of the section (where they were before they moved under
        ``calibration:``) are moved there with a FutureWarning naming the new key; a key given both ways is an error.
        Driven by the ``calibration`` field's :class:`CalibrationOptions` model, so every method gets it."""
        field = cls.model_fields.get("calibration")
        nested = field.annotation if field is not None else None
        if not isinstance(data, dict) or not (isinstance(nested, type) and issubclass(nested, CalibrationOptions)):
            return data
        flat = [k for k in data if k in nested.model_fields and k not in cls.model_fields]
        if not flat:
            return data
        section = cls.section_name or cls.__name__
        block = data.get("calibration")
        if isinstance(block, CalibrationOptions):
            block = {k: getattr(block, k) for k in block.model_fields_set}
        elif block is None:
            block = {}
        if not isinstance(block, dict):
            return data  # the calibration field's own validation reports it (and the flat keys as unknown)
        both = [k for k in flat if k in block]
        if both:
            raise ConfigError("; ".join(f"{k} is given both as {section}.{k} and as {section}.calibration.{k}: keep "
                                        f"only {section}.calibration.{k}" for k in both))
        data, block = dict(data), dict(block)
        for k in flat:
            warnings.warn(f"{section}.{k} is now {section}.calibration.{k} (calibration-only options moved under "
                          f"`calibration:`); the old key still works for now but will be removed", FutureWarning,
                          stacklevel=2)
            block[k] = data.pop(k)
        data["calibration"] = block
        return data

    def noop_reason(self) -> str | None:
        """Why this section, although enabled, would not change training (the engine warns at set-up), or None."""
        return None

    def no_penalty_reason(self) -> str | None:
        """Why a run in which this constraint never returned a penalty still did what was configured (the engine
        then warns at the end of training instead of failing the run), or None."""
        return None


@runtime_checkable
class Runtime(Protocol):
    """What a constraint may use of the training run besides its own config and artifact (``TrainContext.runtime``,
    ``BatchView.runtime``). :class:`~safeguard_plugin.engine.SafeguardEngine` implements it; constraints depend on this
    protocol only, never on the engine."""

    @property
    def model(self) -> torch.nn.Module | None:
        """The model being trained (DDP / DeepSpeed wrappers removed; the PEFT model under LoRA)."""
        ...

    @property
    def tokenizer(self) -> Any:
        """The trainer's tokenizer (None when the integration was given none)."""
        ...

    @property
    def post_instruction_ids(self) -> list[int]:
        """The chat template's post-instruction token ids recorded in the artifact (empty without one)."""
        ...

    @property
    def world_size(self) -> int:
        """Ranks whose gradients the trainer averages (DDP / DeepSpeed); 1 in a single process."""
        ...

    @property
    def collective_forwards(self) -> bool:
        """DeepSpeed ZeRO-3 with several ranks: forwards gather parameters collectively, so every rank must run the
        same sequence of (reference) forwards."""
        ...

    def reference_available(self) -> bool:
        """Whether the original weights can still be run: PEFT (adapter disabled), or before the first update."""
        ...

    def reference(self) -> contextlib.AbstractContextManager[torch.nn.Module]:
        """A block that runs the original weights (PEFT adapters disabled; eval; no grad; the penalty hooks inactive);
        yields the model. Raises when full fine-tuning has already changed them."""
        ...

    def reference_hidden(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Final hidden states ``(B, T, d)`` of the original weights (no grad; the forward stops at the final norm);
        ``kwargs``: attention_mask / position_ids / token_type_ids."""
        ...

    def policy_hidden(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Final hidden states ``(B, T, d)`` of the weights being trained, with autograd graph, for inputs other than
        the training batch (e.g. anchor prompts; the engine's hooks are inactive in it). Call it from ``prefetch`` or
        ``penalty``; a penalty built on it reaches the gradient like any other."""
        ...

    def request_stop(self, reason: str) -> None:
        """Ask the integration to end training after this step, with ``reason`` logged (e.g. a safety alert)."""
        ...

    def loss_scale(self) -> float | torch.Tensor:
        """The factor fp16 dynamic loss scaling multiplies the loss gradient by in the current backward (1.0 without
        it). The engine already applies it to every penalty's gradient; only a constraint that writes gradients itself
        (outside the penalty's autograd graph) must multiply them by it."""
        ...


@dataclass
class TrainContext:
    """What a constraint sees outside the forward pass."""

    model: torch.nn.Module
    runtime: Runtime
    max_steps: int = 0
    global_step: int = 0


@dataclass
class CalibrationContext:
    """What ``Constraint.calibrate`` sees: the model being calibrated (the aligned model), its tokenizer and the
    prompt sets, with the calibration options."""

    model: torch.nn.Module
    tokenizer: Any
    harmful: PromptSet
    harmless: PromptSet
    batch_size: int = 16
    progress: bool = True
    select_frac: float = 0.5
    late_layer_cut: float = 0.2
    # values shared between the constraints calibrated in one run (e.g. a constraint's effective options)
    cache: dict[str, Any] = field(default_factory=dict)
    base_model: torch.nn.Module | None = None  # the pre-alignment checkpoint (CWAC's alignment-delta subspace)
    # {constraint name: config section} for calibration options (sections as dicts or validated configs)
    constraint_configs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainingSetup:
    """The trainer's set-up as an integration reads it before training, for ``Constraint.check_training`` (Axolotl:
    from the YAML, before the model is built; TRL: from the trainer's arguments and model when the callback
    attaches)."""

    adapter: str | None = None  # the trained PEFT adapter's method ("lora", "qlora", ...); None: full fine-tuning
    packing: bool = False  # several examples per row (TRL packing / padding_free, Axolotl sample_packing)
    framework: str = ""  # "trl", "axolotl": for messages that name the setting to change


@dataclass
class OutputHead:
    """The model's LM head as maths: ``logits = softcap(scale · (h Wᵀ + b))`` (the transforms TRL's fused head
    and the models apply). Use it on selected positions only: the vocabulary may be large."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None

    def transform(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float]:
        """``(logits, d logits / d raw)`` from raw ``h Wᵀ + b`` (the derivative is elementwise)."""
        z = raw * self.scale if self.scale != 1.0 else raw
        if not self.softcap:
            return z, self.scale
        t = torch.tanh(z / self.softcap)
        return t * self.softcap, self.scale * (1 - t * t)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Float32 logits for hidden states ``(..., d)`` (differentiable)."""
        raw = F.linear(h.to(self.weight.dtype), self.weight, self.bias).float()
        return self.transform(raw)[0]


@dataclass
class BatchView:
    """One training micro-batch, as seen at the engine's penalty point (the last hooked decoder layer, or the
    final hidden states when a constraint sets ``uses_final_hidden``).

    ``acts[layer]`` is ``(B, P, d)``: decoder-layer outputs at the ``P`` post-instruction positions of
    each example (with autograd graph). ``valid`` marks rows whose positions were found; ``reference``
    holds each constraint's cached original-model values for those rows (``(B, ...)``).

    With ``uses_final_hidden``: ``hidden`` is ``(B, T, d)`` (with graph), ``labels`` / ``attention_mask`` /
    ``forward_kwargs`` are what the trainer passed to the model's forward, ``head`` is the LM head.
    """

    input_ids: torch.Tensor
    acts: dict[int, torch.Tensor]
    valid: torch.Tensor
    reference: dict[str, torch.Tensor] = field(default_factory=dict)
    ref_valid: torch.Tensor | None = None
    global_step: int = 0
    max_steps: int = 0
    hidden: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    forward_kwargs: dict[str, Any] = field(default_factory=dict)
    head: OutputHead | None = None
    runtime: Runtime | None = field(default=None, repr=False)
    # Several ranks (DDP / DeepSpeed): the trainer averages gradients over ``world_size`` ranks, so a penalty that is a
    # mean over rows / tokens must divide its local sum by (global count / world_size) to equal the single-process
    # penalty of the whole batch. ``global_rows``: rows with a usable reference (``ref_valid``, else ``valid``) summed
    # over ranks; ``global_tokens``: trained next-token positions summed over ranks. None in a single process.
    world_size: int = 1
    global_rows: float | None = None
    global_tokens: float | None = None
    _ref_hidden: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)

    def rows_denominator(self, local: float) -> float:
        """Denominator of a per-row mean: ``local`` in one process, global rows / world size across ranks."""
        return local if self.global_rows is None else self.global_rows / self.world_size

    def tokens_denominator(self, local: float) -> float:
        """Denominator of a per-token mean: ``local`` in one process, global tokens / world size across ranks."""
        return local if self.global_tokens is None else self.global_tokens / self.world_size

    def next_token_targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mask, targets)``, both ``(B, T)``, aligned with ``hidden``: ``mask[b, t]`` is True where position
        ``t`` predicts a trained token (label != -100), ``targets[b, t]`` is that token (0 elsewhere). Same
        shift as the causal-LM loss (``shift_labels``, when the trainer passes them, are used as they are)."""
        shift = self.forward_kwargs.get("shift_labels")
        if shift is not None:
            tgt = shift
        elif self.labels is not None:
            tgt = torch.full_like(self.labels, -100)
            tgt[:, :-1] = self.labels[:, 1:]
        else:
            raise SafeguardRuntimeError("the training forward received no labels")
        mask = tgt != -100
        return mask, torch.where(mask, tgt, torch.zeros_like(tgt))

    def reference_hidden(self, rows: Sequence[int] | torch.Tensor | None = None, length: int | None = None) -> torch.Tensor:
        """Final hidden states of the original model (PEFT adapters disabled) for ``rows`` of this batch, truncated
        to the first ``length`` positions (causal: earlier positions are unchanged); ``(len(rows), length, d)``,
        no grad. Runs one reference forward per distinct request (counted by the engine); raises when the
        original weights are no longer reachable (full fine-tuning after the first update)."""
        if self.runtime is None:
            raise SafeguardRuntimeError("this BatchView has no runtime attached")
        idx = torch.arange(self.input_ids.shape[0]) if rows is None else torch.as_tensor(rows).reshape(-1).cpu()
        key = (tuple(idx.tolist()), length)
        if key not in self._ref_hidden:
            B = self.input_ids.shape[0]
            sel = idx.to(self.input_ids.device)
            sl = slice(None) if length is None else slice(0, int(length))
            kw = {}
            for k in ("attention_mask", "position_ids", "token_type_ids"):
                v = self.forward_kwargs.get(k)
                if isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape[0] == B:
                    kw[k] = v[sel.to(v.device)][:, sl]
            self._ref_hidden[key] = self.runtime.reference_hidden(self.input_ids[sel][:, sl], **kw)
        return self._ref_hidden[key]


class Constraint:
    """Base class. Subclasses set ``name``, ``config_class`` and ``requires`` and override what they need."""

    name: ClassVar[str]
    config_class: ClassVar[type[ConstraintConfig]] = ConstraintConfig
    requires: ClassVar[tuple[str, ...]] = ()  # artifact components
    uses_reference: ClassVar[bool] = False
    prompt_reference: ClassVar[bool] = True  # with uses_reference: engine caches reference_values() per prompt
    uses_final_hidden: ClassVar[bool] = False  # penalty at the final hidden states (LM head input)
    # metrics() reads trainable parameters (e.g. adapter factors): under ZeRO-3 the engine gathers them around it
    metrics_read_params: ClassVar[bool] = False
    # calibrate() reads the base model's own Linear layers (weights, inputs, gradients): integrations must run it
    # before PEFT wraps them (e.g. Axolotl's pre_lora_load), not on the adapter-disabled PEFT model
    calibrates_base_layers: ClassVar[bool] = False
    # what calibration costs beyond forward passes, shown in `safeguard calibrate`'s plan (measured figures)
    calibration_note: ClassVar[str] = ""
    # save_model() / load_model() replace the trainer's own model save and resume load (see the module docstring)
    owns_model_save: ClassVar[bool] = False
    # modify_model() works on the run's LoRA adapters: the trainer must train a LoRA / QLoRA adapter
    requires_lora_adapter: ClassVar[bool] = False
    # the method acts inside the LoRA modules' forward: fused LoRA kernels that bypass it must be off
    requires_unfused_lora: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # the config class learns its section's name (its messages say `cwac.energy`, not `CWACConfig.energy`)
        cfg, name = cls.__dict__.get("config_class"), cls.__dict__.get("name")
        if isinstance(name, str) and cfg not in (None, ConstraintConfig) and "section_name" not in cfg.__dict__:
            cfg.section_name = name

    def __init__(self, config: ConstraintConfig, artifact: Artifact | None):
        self.config = config
        self.artifact = artifact
        if self.requires and artifact is None:
            raise ConfigError(
                f"constraint '{self.name}' needs a calibration artifact (components: {', '.join(self.requires)}); "
                "set `artifact:` to the folder written by `safeguard calibrate`"
            )
        for comp in self.requires:
            artifact.component(comp)  # raises a clear ArtifactError when missing

    # -- calibration (offline)
    @classmethod
    def calibrate(cls, ctx: CalibrationContext, artifact: Artifact) -> None:
        """Add this constraint's components to ``artifact`` (see :mod:`safeguard_plugin.calibration`)."""

    # -- before training
    @classmethod
    def check_training(cls, config: ConstraintConfig, setup: TrainingSetup) -> None:
        """Raise :class:`~safeguard_plugin.errors.ConfigError` when the trainer's set-up cannot work with this
        constraint (called by the integrations before training; the capability flags above are checked by the
        integrations themselves)."""

    def layers(self) -> list[int]:
        """Decoder layers whose outputs the penalty needs (empty: no penalty)."""
        return []

    def validate_model(self, model: torch.nn.Module) -> None:
        """Raise before step 1 if the artifact does not fit the model (layers, dimensions)."""

    def modify_model(self, model: torch.nn.Module) -> None:
        """In-place model surgery (e.g. adapter initialisation), run by ``engine.setup`` before the optimizer
        exists. Must keep the same top-level model object, since the trainer already holds a reference to it."""

    def prepare(self, ctx: TrainContext) -> None:
        """Model surgery / precomputation before the optimizer's first step."""

    def precompute(self, ctx: TrainContext, batches: list[dict[str, Any]], batch_size: int = 16,
                   progress: bool = True) -> int:
        """Per-example values computed once before training from the training batches (collated dicts with
        ``input_ids`` and, from the trainers, ``labels`` / ``attention_mask``), while the original weights are
        reachable (``ctx.runtime.reference()``). Called by ``engine.precompute_references``; returns how many
        new examples were processed."""
        return 0

    # -- training
    def reference_values(self, acts: dict[int, torch.Tensor]) -> torch.Tensor:
        """Values to cache per example from original-model activations ``{layer: (n, P, d)}`` -> ``(n, ...)``."""
        raise NotImplementedError

    def prefetch(self, batch: BatchView) -> None:
        """Called before ``penalty`` for the same micro-batch, before the engine gathers the LM head (ZeRO-3): the
        place for extra forwards (``batch.reference_hidden``, cached for ``penalty``). Under ZeRO-3 with several
        ranks forwards are collective: every rank must run the same number of them here
        (``batch.runtime.collective_forwards``)."""

    def penalty(self, batch: BatchView) -> torch.Tensor | None:
        """Scalar penalty for this micro-batch (already weighted), or None when it does not apply."""
        return None

    def after_step(self, ctx: TrainContext) -> None:
        """Exact weight edits after each optimizer step."""

    def metrics(self) -> dict[str, float]:
        """Metrics since the last call (names without the ``safeguard/`` prefix)."""
        return {}

    def record(self) -> dict[str, Any]:
        """What this constraint measured over the run, for the run record and the model card
        (:mod:`safeguard_plugin.record`): a JSON-able dict, empty when there is nothing to report (the default).
        Keys the card renders: ``{"refusal_score"|"projection"|"cosine": {"start": x, "end": y}}`` (a start/end table;
        ``refusal_score`` also gives the verdict line) and ``"curve": [{"step": n, "refusal_score": x, ...}, ...]``
        (plotted when matplotlib is installed); anything else is kept in ``safeguard_run.json``."""
        return {}

    # -- state saved with Trainer checkpoints (schedules derive from global_step, so usually nothing)
    def state_dict(self) -> dict[str, Any]:
        """Tensors and JSON-able values to keep with a checkpoint (``engine.save_state``)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    # -- the trainer's own model saves and loads (only with ``owns_model_save``)
    def save_model(self, model: torch.nn.Module, folder: str | os.PathLike) -> str | None:
        """Write ``model`` (the one this constraint modified) to ``folder`` in place of the trainer's
        ``save_pretrained``: what a plain PEFT / transformers save would write for the trained model (e.g. a standard
        adapter ``PeftModel.from_pretrained`` loads), plus whatever ``load_model`` needs to resume training. Returns a
        note for the log (e.g. how to reload it), or None."""
        raise NotImplementedError(f"constraint '{self.name}' sets owns_model_save but does not implement save_model")

    def load_model(self, model: torch.nn.Module, folder: str | os.PathLike) -> bool:
        """Restore into ``model`` the trained state ``save_model`` wrote to ``folder`` (resuming, best model); False
        when ``folder`` holds no such save (the trainer then loads it as usual)."""
        return False
