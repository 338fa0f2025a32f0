"""The engine: one per training run. Builds constraints from the config, hooks the model once, turns
penalties into gradients, runs after-step edits, guards against NaN, and reports metrics.

Loss routes (both tested to give the same weights):

* ``inject`` (callbacks, plugins): at the penalty point the summed penalty ``P`` is attached to the
  activation there through an identity autograd function whose backward also sends ``S/GA`` to ``P``, where ``S``
  is the current loss scale (:meth:`SafeguardEngine.loss_scale`: fp16 dynamic loss scaling multiplies the loss
  gradient by it, so the penalty's gradient must be multiplied too; 1 otherwise). The gradient is then that of
  ``S·(loss + P/GA)``, whatever the trainer does with the loss (TRL 1.16 builds its loss from fused log-probs, not
  ``outputs.loss``), and the scaler unscales (or skips an overflowing step) as usual.
* ``collect`` (trainer mixin): the penalty tensor is kept and the trainer adds it to the loss it returns.

Penalty point: the output of the model's final norm (the LM head's input; outside the decoder layers, so outside
any gradient-checkpointed region — decoder-layer hooks only store activations), or the last hooked decoder layer
when a model has no recognisable final norm. Constraints that set ``uses_final_hidden`` get the final hidden
states and the trainer's forward kwargs (labels, attention mask) captured by a pre-hook on the model. There a constraint may ask for a no-grad forward of the original weights
on (part of) the batch (``BatchView.reference_hidden``): under PEFT the adapter-disabled model, no copy.

The engine only orchestrates: model helpers (final norm, LM head, quantization check) live in
:mod:`safeguard_plugin.modeling`, the reference cache and the checkpoint state file in :mod:`safeguard_plugin.state`,
and constraints see the engine only through :class:`~safeguard_plugin.constraints.base.Runtime`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .artifacts import Artifact
from .config import SafeguardConfig, load_config
from .constraints.base import BatchView, Constraint, TrainContext
from .distributed import (
    all_reduce_sum,
    broadcast_object,
    gathered,
    is_distributed,
    sync_folder,
    world_size,
    zero3_active,
)
from .errors import ConfigError, SafeguardRuntimeError  # SafeguardRuntimeError: re-exported here
from .modeling import (
    StopForward,
    check_quantized_device,
    find_decoder_layers,
    find_final_norm,
    find_suffix_positions,
    fingerprint_params,
    is_peft_model,
    output_head,
    reference_mode,
    run_until,
    unwrap_model,
)
from .registry import get_constraint
from .state import STATE_FILE, ReferenceCache, load_state, save_state

logger = logging.getLogger("safeguard_plugin")


# What to change when no training example holds the artifact's post-instruction tokens; integrations set their own
# (``SafeguardEngine.data_format_hint``: the Axolotl plugin names the YAML keys).
TRL_DATA_FORMAT_HINT = (
    "Format the data with the same chat template the artifact was calibrated with (in TRL: a conversational dataset, "
    "'messages' or 'prompt'/'completion' lists of {'role', 'content'}, with the tokenizer's chat template; not a plain "
    "'text' column), or re-calibrate with this tokenizer."
)
# Penalties skipped as non-finite (nan_policy: skip): more than this share of a run's penalty evaluations fails it
# (checked at the end of training, and during training once MIN_SKIP_SAMPLE evaluations were made).
MAX_SKIPPED_SHARE = 0.1
MIN_SKIP_SAMPLE = 50


class _InjectPenalty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, penalty, scale, engine):
        ctx.scale, ctx.engine, ctx.pdtype = scale, engine, penalty.dtype
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad_h):
        ctx.engine._backward_seen += 1
        # read at backward time: the loss scale of this backward (a dynamic scaler changes it between steps)
        loss_scale = torch.as_tensor(ctx.engine.loss_scale(), dtype=ctx.pdtype, device=grad_h.device)
        return grad_h, torch.full((), ctx.scale, dtype=ctx.pdtype, device=grad_h.device) * loss_scale, None, None


def _response_tokens(batch: BatchView) -> int:
    """Trained (label != -100) next-token positions of a micro-batch (0 without labels)."""
    try:
        return int(batch.next_token_targets()[0].sum())
    except RuntimeError:
        return 0


def _check_same_artifact(artifact: Artifact) -> None:
    """Every rank loaded the same artifact (same manifest), else fail on every rank."""
    import json

    digest = hashlib.blake2b(json.dumps(artifact.manifest, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()
    ref = broadcast_object(digest)
    same = all_reduce_sum([0.0 if digest == ref else 1.0])
    if same[0]:
        raise SafeguardRuntimeError(
            f"the safeguard artifact {artifact.path} differs between ranks ({int(same[0])} rank(s) differ from rank 0): "
            "give every node the same folder (or none: rank 0's is then copied over)"
        )


class SafeguardEngine:
    """Framework-free runtime for a set of constraints.

    Typical use (the integrations do this for you)::

        engine = SafeguardEngine("safeguard.yaml")
        engine.setup(model, tokenizer)            # load + check artifact, build constraints, hook layers
        engine.precompute_references(batches)     # cached original-model values (no second model copy)
        ... training: forward passes get the penalty; after each optimizer step: engine.after_step()
        engine.metrics()                          # {'safeguard/procon_loss': ..., ...}
    """

    def __init__(self, config: str | dict | SafeguardConfig, artifact: Artifact | None = None, mode: str = "inject"):
        self.config = load_config(config)
        self.artifact = artifact
        if mode not in ("inject", "collect"):
            raise ConfigError("mode must be 'inject' or 'collect'")
        self.mode = mode
        self.constraints: list[Constraint] = []
        self.model: nn.Module | None = None
        self.tokenizer = None
        self.stop_reason: str | None = None  # set through request_stop (e.g. by the monitor) to end training
        self.grad_accum = 1
        self.global_step = 0
        self.max_steps = 0
        self.optimizer_steps_seen = 0
        self._handles: list[Any] = []
        self._layers: list[int] = []
        self._suffix: list[int] = []
        self._ids: torch.Tensor | None = None
        self._acts: dict[int, torch.Tensor] = {}
        self._fwd: dict[str, Any] = {}  # top-level forward kwargs of the current training forward
        self._final_users = False
        self._final_norm: nn.Module | None = None
        self._in_reference = False
        self._pending: torch.Tensor | None = None
        self._backward_seen = 0
        self._refs = ReferenceCache()  # original-model values per constraint and prompt prefix
        self._world = 1  # ranks whose gradients the trainer averages (DDP / DeepSpeed)
        self._collective_forwards = False  # ZeRO-3 with > 1 rank: every rank must run the same forwards
        self._loss_scale: Callable[[], float | torch.Tensor] | None = None  # set by the integration (fp16 scaling)
        # counters
        self.n_forward = 0
        self.n_rows = 0
        self.n_rows_found = 0
        self.n_rows_ref_missing = 0
        self.n_reference_forwards = 0  # no-grad forwards of the original weights (precompute + per batch)
        self.n_policy_forwards = 0  # forwards of the trained weights on other inputs (constraints' anchor prompts)
        self.nan_skipped = 0
        self._pen_sum = 0.0
        self._pen_n = 0
        # dead-constraint checks: penalty evaluations (a constraint returned a value) and those skipped as non-finite,
        # kept with checkpoints; per constraint: penalties returned and non-finite ones; optimizer steps this session
        self.n_penalty_evals = 0
        self.n_penalty_skipped = 0
        self._pen_by: dict[str, int] = {}
        self._nonfinite_by: dict[str, int] = {}
        self._session_steps = 0
        self.data_format_hint = TRL_DATA_FORMAT_HINT

    # ------------------------------------------------------------------------------------------ setup
    def setup(self, model: nn.Module, tokenizer=None) -> SafeguardEngine:
        """Load and check the artifact against ``model``, build the constraints, register the hooks."""
        if self.model is not None:
            if unwrap_model(model) is self.model:
                return self
            self.detach()
        self.model = unwrap_model(model)
        self.tokenizer = tokenizer
        check_quantized_device(self.model)
        if self.artifact is None and self.config.artifact:
            if is_distributed():  # no shared filesystem assumed: ranks that do not see the folder get rank 0's
                sync_folder(self.config.artifact)
            self.artifact = Artifact.load(self.config.artifact)
            if is_distributed():
                _check_same_artifact(self.artifact)
        if self.artifact is not None:
            with gathered(fingerprint_params(self.model)):  # model built under ZeRO-3 zero.Init: partitioned
                problems = self.artifact.check_model(self.model, tokenizer, strict=self.config.strict_fingerprint)
            for w in problems:
                warnings.warn(f"safeguard: {w}", stacklevel=2)
            self._suffix = list(self.artifact.manifest["tokenizer"].get("post_instruction_ids", []))
        self.constraints = [get_constraint(name)(cfg, self.artifact) for name, cfg in self.config.constraint_configs().items()]
        for c in self.constraints:
            reason = c.config.noop_reason() if hasattr(c.config, "noop_reason") else None
            if reason:
                logger.warning("safeguard: WARNING: %s", reason)
                warnings.warn(f"safeguard: {reason}", stacklevel=2)
        for c in self.constraints:
            c.validate_model(self.model)
        for c in self.constraints:
            c.modify_model(self.model)
        self._layers = sorted({layer for c in self.constraints for layer in c.layers()})
        self._final_users = any(c.uses_final_hidden for c in self.constraints)
        if self._layers and not self._suffix:
            raise SafeguardRuntimeError("the artifact records no post-instruction tokens; re-run `safeguard calibrate`")
        self._attach()
        logger.info("safeguard: active constraints %s on layers %s", [c.name for c in self.constraints], self._layers)
        return self

    def banner(self) -> str:
        parts = [f"{c.name}({', '.join(f'{k}={v}' for k, v in c.config.model_dump().items() if k != 'enabled')})"
                 for c in self.constraints]
        art = self.artifact.path if self.artifact is not None else "none"
        return f"safeguard active: {'; '.join(parts)} | artifact {art} | layers {self._layers}"

    @property
    def post_instruction_ids(self) -> list[int]:
        """The chat template's post-instruction token ids recorded in the artifact (empty without one)."""
        return list(self._suffix)

    def _attach(self) -> None:
        if not self._layers and not self._final_users:
            return
        emb = self.model.get_input_embeddings()
        self._handles.append(emb.register_forward_pre_hook(self._on_embed))
        self._handles.append(self.model.register_forward_pre_hook(self._on_forward, with_kwargs=True))
        # The penalty point is the final norm (outside the decoder layers, so outside any gradient-checkpointed
        # region: with transformers < 5.24 layer hooks also run in the recompute). Layer hooks only store outputs.
        try:
            self._final_norm = find_final_norm(self.model)
        except SafeguardRuntimeError:
            if self._final_users:
                raise
            self._final_norm = None
        if self._layers:
            blocks = find_decoder_layers(self.model)
            last = None if self._final_norm is not None else self._layers[-1]
            for idx in self._layers:
                self._handles.append(blocks[idx].register_forward_hook(self._make_layer_hook(idx, idx == last)))
        if self._final_norm is not None:
            self._handles.append(self._final_norm.register_forward_hook(self._on_final_hidden))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._final_norm = None
        self.model = None

    # ------------------------------------------------------------------------------------------ hooks
    def _active(self) -> bool:
        return (not self._in_reference) and self.model is not None and self.model.training and torch.is_grad_enabled()

    def _on_embed(self, _module, args):
        if not self._active():
            return
        ids = args[0] if args else None
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.long, torch.int, torch.int32):
            raise SafeguardRuntimeError(
                "safeguard needs input_ids in the training forward (the model was called with inputs_embeds)"
            )
        self._ids = ids
        self._acts = {}

    def _on_forward(self, _module, _args, kwargs):
        if self._active():
            self._fwd = kwargs
        return None

    def _on_final_hidden(self, _mod, _inp, out):
        if not self._active() or self._ids is None:
            return None
        h = out[0] if isinstance(out, tuple) else out
        h_new = self._penalty_at(h, hidden=h if self._final_users else None)
        if h_new is h:
            return None
        return (h_new, *out[1:]) if isinstance(out, tuple) else h_new

    def _make_layer_hook(self, idx: int, is_last: bool):
        def hook(_mod, _inp, out):
            if not self._active() or self._ids is None:
                return None
            h = out[0] if isinstance(out, tuple) else out
            self._acts[idx] = h
            if not is_last:
                return None
            h_new = self._penalty_at(h)
            if h_new is h:
                return None
            return (h_new, *out[1:]) if isinstance(out, tuple) else h_new

        return hook

    def _gather(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        starts = find_suffix_positions(ids, self._suffix)
        valid = starts >= 0
        P = len(self._suffix)
        pos = starts.clamp(min=0).unsqueeze(1) + torch.arange(P, device=ids.device)
        return pos, valid

    def _prompt_ref_users(self) -> list[Constraint]:
        return [c for c in self.constraints if c.uses_reference and c.prompt_reference]

    def _penalty_at(self, h: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Compute and attach the summed penalty at the penalty point; ``hidden``: final hidden states."""
        ids, self._ids = self._ids, None
        acts_full, self._acts = self._acts, {}
        fwd, self._fwd = self._fwd, {}
        self.n_forward += 1
        if self._layers:
            pos, valid = self._gather(ids)
            self.n_rows += int(ids.shape[0])
            n_valid = int(valid.sum())
            self.n_rows_found += n_valid
        else:
            pos = torch.zeros((ids.shape[0], 0), dtype=torch.long, device=ids.device)
            valid = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
            n_valid = 0
        if n_valid == 0 and hidden is None:
            if self._world > 1:
                all_reduce_sum([0.0, 0.0])  # this rank's share of the global counts (collective)
            return h
        acts = {}
        if n_valid:
            for layer, a in acts_full.items():
                idx = pos.to(a.device).unsqueeze(-1).expand(-1, -1, a.shape[-1])
                acts[layer] = a.gather(1, idx)
        batch = BatchView(input_ids=ids, acts=acts, valid=valid.to(h.device), global_step=self.global_step,
                          max_steps=self.max_steps)
        if hidden is not None:
            batch.hidden = hidden
            batch.labels = fwd.get("labels")
            mask = fwd.get("attention_mask")
            batch.attention_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
            batch.forward_kwargs = fwd
            batch.head = output_head(self.model)
            batch.runtime = self
        if n_valid and self._prompt_ref_users():
            self._attach_reference(batch, ids, pos, valid)
        if self._world > 1:
            # Per-rank counts that normalise the penalties, summed over ranks: with them a constraint's per-rank
            # penalty, averaged over ranks by DDP / DeepSpeed, equals the single-process penalty of the whole batch.
            rows = batch.ref_valid if batch.ref_valid is not None else batch.valid
            g = all_reduce_sum([float(rows.sum()), float(_response_tokens(batch)) if hidden is not None else 0.0])
            batch.world_size, batch.global_rows, batch.global_tokens = self._world, float(g[0]), float(g[1])
        for c in self.constraints:
            if n_valid or c.uses_final_hidden:
                c.prefetch(batch)  # extra forwards, before the LM head is gathered
        head = [batch.head.weight, batch.head.bias] if batch.head is not None else []
        total = None
        produced = []
        with gathered(head):  # ZeRO-3: the LM head is partitioned outside its own forward (collective gather)
            for c in self.constraints:
                if not n_valid and not c.uses_final_hidden:
                    continue  # no post-instruction positions in this micro-batch
                p = c.penalty(batch)
                if p is not None:
                    produced.append((c.name, p))
                    self._pen_by[c.name] = self._pen_by.get(c.name, 0) + 1
                    total = p if total is None else total + p
        if total is None:
            return h
        total = total.float()
        value = float(total.detach())
        self.n_penalty_evals += 1
        if not math.isfinite(value):
            self.nan_skipped += 1
            self.n_penalty_skipped += 1
            for name, p in produced:
                if not bool(torch.isfinite(p.detach()).all()):
                    self._nonfinite_by[name] = self._nonfinite_by.get(name, 0) + 1
            if self.config.nan_policy == "raise":
                raise SafeguardRuntimeError(f"safeguard penalty is {value} at step {self.global_step}")
            warnings.warn(f"safeguard: non-finite penalty ({value}) at step {self.global_step}; skipped this "
                          f"micro-batch's penalty (count {self.nan_skipped})", stacklevel=2)
            return h
        self._pen_sum += value
        self._pen_n += 1
        if self.mode == "collect":
            self._pending = total if self._pending is None else self._pending + total
            return h
        return _InjectPenalty.apply(h, total, 1.0 / self.grad_accum, self)

    def pop_pending_penalty(self) -> torch.Tensor | None:
        """``collect`` mode: the summed penalty of the forward passes since the last call."""
        p, self._pending = self._pending, None
        return p

    # -------------------------------------------------------------------------------------- references
    def _attach_reference(self, batch: BatchView, ids, pos, valid) -> None:
        users = self._prompt_ref_users()
        names = [c.name for c in users]
        keys = self._refs.keys(ids, pos, valid)
        missing = [i for i, k in enumerate(keys) if k is not None and not self._refs.holds(k, names)]
        if missing and self._collective_forwards:
            warnings.warn(f"safeguard: {len(missing)} training example(s) have no precomputed reference value; under "
                          "ZeRO-3 with several ranks they cannot be filled lazily (forwards are collective), so their "
                          "penalty is skipped (counted in safeguard/reference_missing). Keep precompute_references on.",
                          stacklevel=2)
        elif missing and self.reference_available():
            # the original weights are still reachable (adapter disabled, or no update yet): fill lazily
            ends = (pos[:, -1] + 1).tolist()
            self._compute_references([ids[i, : ends[i]].tolist() for i in missing])
            missing = []
        ref_valid = valid.clone()
        for i in missing:
            ref_valid[i] = False
        self.n_rows_ref_missing += len(missing)
        for c in users:
            stacked = self._refs.rows(c.name, keys, ref_valid)
            if stacked is None:
                ref_valid[:] = False
                batch.reference[c.name] = torch.zeros(0)
                continue
            batch.reference[c.name] = stacked.to(batch.valid.device)
        batch.ref_valid = ref_valid.to(batch.valid.device)

    def _compute_references(self, prefixes: list[list[int]], batch_size: int = 16, progress: bool = False) -> None:
        """Original-model values for each prompt prefix (which ends with the post-instruction tokens)."""
        users = self._prompt_ref_users()
        if not users or not prefixes:
            return
        self._in_reference = True
        try:
            with reference_mode(self.model):
                self._refs.compute(self.model, users, self._layers, len(self._suffix), prefixes, batch_size, progress)
        finally:
            self._in_reference = False

    def precompute_references(self, batches: Iterable[dict[str, Any]], batch_size: int = 16, progress: bool = True) -> int:
        """Cache original-model values for every example in ``batches`` (dicts with ``input_ids``).

        Prompt-prefix values (``reference_values``): only the prompt prefix up to the post-instruction tokens is
        run, and only through the last constrained layer, so this costs a fraction of one forward epoch. Then
        each constraint's own ``precompute`` (per-example values such as risk scores). Returns the number of new
        prompts / examples.
        """
        if not any(c.uses_reference for c in self.constraints):
            return 0
        consumers = [c for c in self.constraints if type(c).precompute is not Constraint.precompute]
        if consumers:
            batches = list(batches)  # read more than once
        n_new = 0
        for c in consumers:
            n_new += int(c.precompute(self.context(), batches, batch_size=batch_size, progress=progress) or 0)
        if not self._prompt_ref_users():
            return n_new
        seen: dict[bytes, list[int]] = {}
        names = [c.name for c in self._prompt_ref_users()]
        for b in batches:
            ids = b["input_ids"]
            ids = ids if isinstance(ids, torch.Tensor) else torch.as_tensor(ids)
            if ids.ndim == 1:
                ids = ids.unsqueeze(0)
            pos, valid = self._gather(ids)
            ends = (pos[:, -1] + 1).tolist()
            for i, k in enumerate(self._refs.keys(ids, pos, valid)):
                if k is not None and not self._refs.holds(k, names):
                    seen.setdefault(k, ids[i, : ends[i]].tolist())
        self._compute_references(list(seen.values()), batch_size=batch_size, progress=progress)
        return n_new + len(seen)

    # ------------------------------------------------------------------------------ original-weights forwards
    def reference_available(self) -> bool:
        """Whether the original weights can still be run: PEFT (adapter disabled), or before the first update."""
        return self.model is not None and (is_peft_model(self.model) or self.optimizer_steps_seen == 0)

    @contextlib.contextmanager
    def reference(self):
        """Run the original weights inside this block (PEFT adapters disabled; eval; no grad; the engine's own
        hooks inactive). Raises when full fine-tuning has already changed them."""
        if not self.reference_available():
            raise SafeguardRuntimeError(
                f"the original weights are no longer reachable: full fine-tuning has updated them "
                f"({self.optimizer_steps_seen} optimizer steps). Reference values must be precomputed before "
                "training (SafeguardCallback does this at train begin), or train a PEFT adapter (the "
                "adapter-disabled model is the reference)."
            )
        prev = self._in_reference
        self._in_reference = True
        try:
            with reference_mode(self.model):
                yield self.model
        finally:
            self._in_reference = prev

    def _to_final_norm(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Run the model on ``input_ids`` and return the final norm's output ``(B, T, d)``; the forward stops there
        (except under ZeRO-3, which prefetches along the modules of a full forward: never cut one short there)."""
        norm = self._final_norm if self._final_norm is not None else find_final_norm(self.model)
        store: dict[str, torch.Tensor] = {}
        z3 = zero3_active(self.model)

        def grab(_mod, _inp, out):
            store["h"] = out[0] if isinstance(out, tuple) else out
            if not z3:
                raise StopForward

        kwargs.pop("use_cache", None)
        handle = norm.register_forward_hook(grab)
        try:
            run_until(self.model, input_ids=input_ids, **kwargs)
        finally:
            handle.remove()
        if "h" not in store:
            raise SafeguardRuntimeError("the forward did not reach the final norm")
        return store["h"]

    @torch.no_grad()
    def reference_hidden(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Final hidden states ``(B, T, d)`` of the original weights (the forward stops at the final norm, so no
        logits are built). ``kwargs``: attention_mask / position_ids. Counted in ``n_reference_forwards``."""
        with self.reference():
            h = self._to_final_norm(input_ids, **kwargs)
        self.n_reference_forwards += 1
        return h

    def policy_hidden(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Final hidden states ``(B, T, d)`` of the weights being trained, *with* autograd graph, for inputs other than
        the training batch (e.g. anchor prompts): the engine's hooks are inactive in this forward, adapters stay on,
        and the forward stops at the final norm. Counted in ``n_policy_forwards``."""
        prev = self._in_reference
        self._in_reference = True  # the engine's hooks stay out of this forward
        try:
            h = self._to_final_norm(input_ids, **kwargs)
        finally:
            self._in_reference = prev
        self.n_policy_forwards += 1
        return h

    # ------------------------------------------------------------------------------------ checkpoint state
    STATE_FILE = STATE_FILE
    # engine counter -> its key in the state file
    _SAVED_COUNTERS = {"nan_skipped": "nan_skipped", "optimizer_steps_seen": "optimizer_steps_seen",
                       "n_penalty_evals": "penalty_evals", "n_penalty_skipped": "penalty_skipped"}

    def save_state(self, folder: str) -> None:
        """Write the reference cache, the constraints' state and the counters next to a Trainer checkpoint
        (atomically; see :mod:`safeguard_plugin.state`)."""
        save_state(folder, self._refs, self.constraints,
                   {key: getattr(self, attr) for attr, key in self._SAVED_COUNTERS.items()})

    def load_state(self, folder: str) -> bool:
        """Restore what :meth:`save_state` wrote to ``folder``; False when it holds no state file."""
        counters = load_state(folder, self._refs, self.constraints, self._SAVED_COUNTERS.values())
        if counters is None:
            return False
        for attr, key in self._SAVED_COUNTERS.items():
            setattr(self, attr, counters[key])
        return True

    # ---------------------------------------------------------------------------------------- lifecycle
    def begin_training(self, max_steps: int, grad_accum: int, global_step: int = 0) -> None:
        self.max_steps, self.grad_accum, self.global_step = int(max_steps), max(1, int(grad_accum)), int(global_step)
        self.sync_distributed()
        ctx = self.context()
        for c in self.constraints:
            c.prepare(ctx)

    def sync_distributed(self) -> None:
        """Read the process-group set-up (called by ``begin_training``, after the trainer wrapped the model)."""
        self._world = world_size()
        self._collective_forwards = self._world > 1 and zero3_active(self.model)

    @property
    def collective_forwards(self) -> bool:
        """ZeRO-3 with several ranks: forwards gather parameters collectively, so every rank must run the same
        sequence of (reference) forwards."""
        return self._collective_forwards

    @property
    def world_size(self) -> int:
        """Ranks whose gradients the trainer averages (read at ``begin_training``)."""
        return self._world

    def set_loss_scale(self, provider: Callable[[], float | torch.Tensor] | None) -> None:
        """Where :meth:`loss_scale` reads the trainer's current loss scale from (a function called once per backward;
        :func:`safeguard_plugin.precision.trainer_loss_scale` for transformers / accelerate / DeepSpeed). The
        integrations set it at train begin; a custom loop with a ``torch.amp.GradScaler`` sets
        ``lambda: grad_scaler_scale(scaler)``. None: no loss scaling."""
        self._loss_scale = provider

    def loss_scale(self) -> float | torch.Tensor:
        """The factor the trainer's loss scaler multiplies the loss gradient by in the current backward (fp16 dynamic
        loss scaling), 1.0 without one. The injected penalty gradient is multiplied by it (``inject`` mode; in
        ``collect`` mode the penalty is part of the scaled loss already)."""
        return 1.0 if self._loss_scale is None else self._loss_scale()

    def request_stop(self, reason: str) -> None:
        """A constraint asks to end training (``stop_reason``: the integrations stop after this step)."""
        self.stop_reason = reason if not self.stop_reason else f"{self.stop_reason}; {reason}"

    def context(self) -> TrainContext:
        return TrainContext(model=self.model, runtime=self, max_steps=self.max_steps, global_step=self.global_step)

    def after_step(self, global_step: int) -> None:
        """Call after each optimizer step (``on_step_end``): runs edits and the first-steps sanity checks."""
        self.global_step = int(global_step)
        self.optimizer_steps_seen += 1
        self._session_steps += 1
        ctx = self.context()
        for c in self.constraints:
            c.after_step(ctx)
        self._sanity_check()

    def end_training(self) -> None:
        """Call when training ends (``on_train_end``): the checks of the first steps for a run that ended before
        ``check_first_steps``, and the checks over the whole run. Raises :class:`SafeguardRuntimeError` when a
        constraint never acted (hooks never ran, no post-instruction position found, no penalty computed, or too
        many penalties skipped as non-finite)."""
        if self._session_steps == 0 or not (self._layers or self._final_users):
            return  # no optimizer step in this process (e.g. resumed at the last step), or nothing hooked
        steps = self._session_steps
        counts = [float(self.n_forward), float(self.n_rows_found)] + [float(self._pen_by.get(c.name, 0))
                                                                     for c in self.constraints]
        if self._world > 1:  # the same decision on every rank (collective: every rank ends training)
            counts = all_reduce_sum(counts).tolist()
        n_forward, n_found, pens = counts[0], counts[1], counts[2:]
        if n_forward == 0:
            raise SafeguardRuntimeError(
                f"safeguard's hooks did not run during the {steps} training step(s), so the constraints did not change "
                "training. The trainer must call the same model object safeguard was attached to (attach after "
                "PEFT wrapping / model surgery), with input_ids."
            )
        if self._layers and n_found == 0:
            raise SafeguardRuntimeError(self._no_positions_message(f"the {steps} training step(s) of this run"))
        self._check_skipped(final=True)
        for c, n_pen in zip(self.constraints, pens):
            if not (c.layers() or c.uses_final_hidden) or n_pen:
                continue
            why = c.config.no_penalty_reason() if hasattr(c.config, "no_penalty_reason") else None
            if why:
                msg = f"safeguard: {c.name} computed no penalty in this run: {why}"
                logger.warning(msg)
                warnings.warn(msg, stacklevel=2)
                continue
            found = (f"; post-instruction positions were found in {self.n_rows_found} of {self.n_rows} rows"
                     if self._layers else "")
            missing = (f", {self.n_rows_ref_missing} of them without a reference value (precompute_references off, "
                       "or full fine-tuning past the first update)" if self.n_rows_ref_missing else "")
            raise SafeguardRuntimeError(
                f"safeguard: constraint '{c.name}' computed no penalty in any of the {self.n_forward} training forwards "
                f"of this run ({steps} optimizer steps){found}{missing}, so it did not change training. Check that the "
                "training data matches the artifact (chat template, labels) and that reference values are precomputed "
                "(SafeguardCallback(precompute_references=True))."
            )

    def _no_positions_message(self, where: str) -> str:
        return (f"safeguard found the post-instruction tokens {self._suffix} in none of the {self.n_rows} training "
                f"examples of {where}, so no constraint applied (safeguard/position_coverage 0.0). "
                f"{self.data_format_hint}")

    def _check_skipped(self, final: bool = False) -> None:
        """Fail when the penalty was skipped as non-finite (``nan_policy: skip``) in every micro-batch of the first
        ``check_first_steps`` steps, or in more than ``MAX_SKIPPED_SHARE`` of the run's penalty evaluations."""
        k = self.config.check_first_steps
        first = self.optimizer_steps_seen == k or (final and self.optimizer_steps_seen < k)
        rate = final or self.optimizer_steps_seen >= k
        if not (first or rate):
            return
        evals, skipped = self.n_penalty_evals, self.n_penalty_skipped
        if self._world > 1:  # the same decision on every rank (collective: every rank runs this check)
            evals, skipped = (int(v) for v in all_reduce_sum([float(evals), float(skipped)]).tolist())
        if not skipped:
            return
        culprits = ", ".join(f"'{n}' in {m}" for n, m in sorted(self._nonfinite_by.items())) or "unknown"
        cause = (f"the penalty was non-finite (NaN/inf) and skipped (nan_policy: skip) in {skipped} of {evals} "
                 f"micro-batches (non-finite from {culprits})")
        fix = ("A NaN or zero direction / std tensor in the artifact gives this: check it with `safeguard inspect "
               f"{self.artifact.path if self.artifact is not None else '<artifact>'}` and re-run `safeguard calibrate`; "
               "otherwise lower the constraint weights. nan_policy: skip is for rare bad steps, not a dead constraint.")
        if first and skipped >= evals:
            raise SafeguardRuntimeError(f"safeguard: {cause}: every penalty of the first {self.optimizer_steps_seen} "
                                        f"optimizer step(s), so no constraint applied. {fix}")
        if rate and (final or evals >= MIN_SKIP_SAMPLE) and skipped > MAX_SKIPPED_SHARE * evals:
            raise SafeguardRuntimeError(f"safeguard: {cause}: {skipped / evals:.0%} of the run's penalties, more than "
                                        f"the {MAX_SKIPPED_SHARE:.0%} nan_policy: skip tolerates. {fix}")

    def _sanity_check(self) -> None:
        if not (self._layers or self._final_users):
            return
        self._check_skipped()
        if self.optimizer_steps_seen > self.config.check_first_steps:
            return
        if self.optimizer_steps_seen == 1 and self.n_forward == 0:
            raise SafeguardRuntimeError(
                "safeguard's hooks did not run during the first training step, so the constraints would not change "
                "training. The trainer must call the same model object safeguard was attached to (attach after "
                "PEFT wrapping / model surgery), with input_ids."
            )
        if self.optimizer_steps_seen == 1 and self.mode == "inject" and self._pen_n and self._backward_seen == 0:
            raise SafeguardRuntimeError(
                "safeguard's penalty was computed but no gradient flowed through it in step 1: the trainer's loss "
                "does not depend on the hooked layers' outputs. Use SafeguardTrainerMixin / SafeguardSFTTrainer."
            )
        if self._layers and self.optimizer_steps_seen == self.config.check_first_steps and self.n_rows_found == 0:
            raise SafeguardRuntimeError(self._no_positions_message(f"the first {self.optimizer_steps_seen} steps"))

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for c in self.constraints:
            params = [p for p in self.model.parameters() if p.requires_grad] if c.metrics_read_params else []
            with gathered(params):  # ZeRO-3 (collective: trainers log on every rank)
                out.update({f"safeguard/{k}": float(v) for k, v in c.metrics().items()})
        if self._pen_n:
            out["safeguard/penalty"] = self._pen_sum / self._pen_n
        out["safeguard/nan_skipped"] = float(self.nan_skipped)
        if self.n_rows:
            out["safeguard/position_coverage"] = self.n_rows_found / self.n_rows
        if self.n_rows_ref_missing:
            out["safeguard/reference_missing"] = float(self.n_rows_ref_missing)
        self._pen_sum, self._pen_n = 0.0, 0
        return out
