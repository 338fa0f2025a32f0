"""The live safety monitor: periodic measurements of the refusal direction and score, and the alert actions."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from ...distributed import broadcast_object, get_full_param, set_full_param
from ...errors import ConfigError, SafeguardRuntimeError
from ..base import CalibrationContext, Constraint, TrainContext
from .config import SafetyMonitorConfig

logger = logging.getLogger("safeguard_plugin")

_CHUNK = 64  # rows per forward when capturing activations (2 × n_prompts rows ≤ 64 -> one forward)


@dataclass
class Measurement:
    cosine: torch.Tensor  # (nL,)
    projection: float  # mean harmful projection on r, std units
    score: float  # mean refusal log-odds on harmful prompts

    @property
    def mean_cosine(self) -> float:
        return float(self.cosine.mean())


class SafetyMonitor(Constraint):
    name = "monitor"
    config_class = SafetyMonitorConfig
    requires = ("refusal_direction",)

    def __init__(self, config: SafetyMonitorConfig, artifact):
        super().__init__(config, artifact)
        tensors, meta = artifact.component("refusal_direction")
        self._layers = sorted(int(x) for x in meta["selected_layers"])
        if not self._layers:
            raise ConfigError("monitor: the artifact's refusal_direction selects no layer; re-run `safeguard calibrate`")
        self._P = int(meta["num_positions"])
        self._pos = int(meta["selected_position"])
        li = torch.tensor(self._layers)
        r = tensors["direction"][li, self._pos].float()  # (nL, d)
        self.r = r / r.norm(dim=-1, keepdim=True).clamp(min=1e-8)
        self.s = tensors["std"][li, self._pos].float().clamp(min=1e-6)  # (nL,)
        self._suffix = list(artifact.manifest.get("tokenizer", {}).get("post_instruction_ids", []))
        self._harmful: list[str] = []
        self._ids: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self._n_harm = 0
        self._baseline: Measurement | None = None
        self._snapshot: dict[str, torch.Tensor] = {}
        self._safe_step = 0
        self._alerts = 0
        self._restored = False
        self._pending: dict[str, float] = {}
        self._history: list[tuple[int, Measurement]] = []  # (step, measurement), the baseline first: for record()

    # ------------------------------------------------------------------------------------------ setup
    def validate_model(self, model: torch.nn.Module) -> None:
        from ...modeling import find_decoder_layers

        n = len(find_decoder_layers(model))
        if max(self._layers) >= n:
            raise ConfigError(f"monitor: artifact layer {max(self._layers)} does not exist (model has {n} layers)")
        from ...distributed import param_shape

        d = param_shape(model.get_input_embeddings().weight)[-1]
        if self.r.shape[-1] != d:
            raise ConfigError(f"monitor: artifact direction has dimension {self.r.shape[-1]}, the model's hidden size is {d}")

    def _load_prompts(self, tokenizer) -> None:
        from ...data import load_prompts
        from ...modeling import pad_right, tokenize_prompts

        n = self.config.n_prompts
        self._harmful = load_prompts(self.config.prompts).heldout[:n]
        harmless = load_prompts(self.config.harmless_prompts).heldout[:n]
        seqs = tokenize_prompts(tokenizer, self._harmful + harmless)
        if self._suffix and any(s[-len(self._suffix):] != self._suffix for s in seqs):
            raise ConfigError("monitor: the rendered prompts do not end with the artifact's post-instruction tokens; "
                             "the tokenizer's chat template differs from the one the artifact was calibrated with")
        if any(len(s) < self._P for s in seqs):
            raise ConfigError("monitor: a rendered prompt is shorter than the post-instruction suffix")
        self._ids, self._mask = pad_right(seqs, tokenizer.pad_token_id or 0)
        self._n_harm = len(self._harmful)

    def prepare(self, ctx: TrainContext) -> None:
        from ...modeling import is_peft_model, reference_mode

        tokenizer = ctx.runtime.tokenizer
        if tokenizer is None:
            raise ConfigError("monitor: needs the tokenizer (pass it to SafeguardEngine.setup / the Trainer)")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self._load_prompts(tokenizer)
        model = ctx.model
        if ctx.global_step > 0 and is_peft_model(model):
            with reference_mode(model):  # resuming under LoRA: the original model is the adapter-disabled one
                self._baseline = self._measure(model, tokenizer)
        else:
            if ctx.global_step > 0:
                warnings.warn("safeguard monitor: resuming full fine-tuning at step "
                              f"{ctx.global_step}; the baseline is measured on the resumed weights", stacklevel=2)
            self._baseline = self._measure(model, tokenizer)
        b = self._baseline
        self._history = [(int(ctx.global_step), b)]
        logger.info("safeguard monitor: baseline cosine %.3f, refusal score %.3f, harmful projection %.3f (std units)",
                    b.mean_cosine, b.score, b.projection)
        if self.config.min_cosine is not None and not b.mean_cosine >= self.config.min_cosine:
            warnings.warn(f"safeguard monitor: the refusal-direction cosine is already {b.mean_cosine:.3f} < "
                          f"min_cosine {self.config.min_cosine} before training; every check will alert. Lower "
                          "monitor.min_cosine or check the artifact and prompt sets.", stacklevel=2)
        self._safe_step = ctx.global_step
        self._restored = False
        self._snapshot = {}
        if self.config.action == "restore":
            self._snapshot = {n: get_full_param(p).cpu() for n, p in self._trainable(model)}

    @staticmethod
    def _trainable(model: torch.nn.Module):
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    # ------------------------------------------------------------------------------------- measuring
    @torch.no_grad()
    def _measure(self, model: torch.nn.Module, tokenizer) -> Measurement:
        from ...eval import refusal_scores
        from ...modeling import capture_layers, run_until

        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            rows: dict[int, list[torch.Tensor]] = {layer: [] for layer in self._layers}
            for s in range(0, self._ids.shape[0], _CHUNK):
                ids, mask = self._ids[s: s + _CHUNK], self._mask[s: s + _CHUNK]
                pos = mask.sum(1) - self._P + self._pos
                with capture_layers(model, self._layers) as store:
                    run_until(model, input_ids=ids.to(device), attention_mask=mask.to(device))
                for layer in self._layers:
                    a = store[layer]
                    rows[layer].append(a[torch.arange(a.shape[0], device=a.device), pos.to(a.device)].float().cpu())
            h = torch.stack([torch.cat(rows[layer], 0) for layer in self._layers], 0)  # (nL, 2n, d)
            scores = refusal_scores(model, tokenizer, self._harmful, batch_size=min(_CHUNK, len(self._harmful)))
        finally:
            model.train(was_training)
        harm, safe = h[:, : self._n_harm], h[:, self._n_harm:]
        diff = harm.mean(1) - safe.mean(1)  # (nL, d)
        cosine = (diff * self.r).sum(-1) / diff.norm(dim=-1).clamp(min=1e-12)
        proj = torch.einsum("lnd,ld->ln", harm, self.r) / self.s.unsqueeze(1)
        return Measurement(cosine=cosine, projection=float(proj.mean()), score=sum(scores) / len(scores))

    # --------------------------------------------------------------------------------------- training
    def after_step(self, ctx: TrainContext) -> None:
        if self._baseline is None or self._restored:
            return
        step = ctx.global_step
        if step % self.config.every_n_steps != 0 and not (ctx.max_steps and step >= ctx.max_steps):
            return
        c, base = self.config, self._baseline
        # every rank measures (under ZeRO-3 forwards are collective); rank 0's values decide on all ranks
        m = broadcast_object(self._measure(ctx.model, ctx.runtime.tokenizer))
        self._history.append((int(step), m))
        cos, drop, shift = m.mean_cosine, base.score - m.score, m.projection - base.projection
        self._pending = {"monitor_cosine": cos, "monitor_refusal_score": m.score, "monitor_score_drop": drop,
                         "monitor_projection_shift": shift}
        self._pending.update({f"monitor_cosine_l{layer}": float(v) for layer, v in zip(self._layers, m.cosine)})
        logger.info("safeguard monitor step %d: cosine %.3f, refusal score %.3f (drop %.3f), projection shift %.3f",
                    step, cos, m.score, drop, shift)
        problems = []  # NaN measurements fail every comparison below, so they alert
        if c.min_cosine is not None and not cos >= c.min_cosine:
            problems.append(f"refusal-direction cosine {cos:.3f} < min_cosine {c.min_cosine}")
        if c.max_score_drop is not None and not drop <= c.max_score_drop:
            problems.append(f"refusal score dropped by {drop:.3f} ({base.score:.3f} -> {m.score:.3f}) "
                            f"> max_score_drop {c.max_score_drop}")
        if c.max_projection_shift is not None and not abs(shift) <= c.max_projection_shift:
            problems.append(f"harmful projection moved by {shift:+.3f} std > max_projection_shift {c.max_projection_shift}")
        if not problems:
            self._safe_step = step
            if self._snapshot:
                with torch.no_grad():
                    for n, p in self._trainable(ctx.model):
                        self._snapshot[n].copy_(get_full_param(p))
            return
        self._alerts += 1
        msg = f"safety monitor alert at step {step}: " + "; ".join(problems)
        if c.action == "restore":
            self._restore(ctx.model)
            msg += f"; restored the trainable weights of step {self._safe_step} (last safe check)"
        if c.action in ("stop", "restore"):
            msg += "; training stopped"
            ctx.runtime.request_stop(msg)
        logger.warning("safeguard: %s", msg)
        warnings.warn(f"safeguard: {msg}", stacklevel=2)

    @torch.no_grad()
    def _restore(self, model: torch.nn.Module) -> None:
        params = dict(self._trainable(model))
        missing = set(self._snapshot) - set(params)
        if missing:
            raise SafeguardRuntimeError(f"monitor: cannot restore, parameters no longer trainable/present: {sorted(missing)[:5]}")
        for n, saved in self._snapshot.items():  # the optimizer's (fp32 master) copy too under DeepSpeed
            set_full_param(params[n], saved)
        self._restored = True

    def metrics(self) -> dict[str, float]:
        out = dict(self._pending)
        out["monitor_alerts"] = float(self._alerts)
        self._pending = {}
        return out

    def record(self) -> dict:
        """Refusal score, harmful projection and direction cosine at the baseline and the last check, the curve of
        every check, the alerts (see :meth:`Constraint.record`)."""
        if not self._history:
            return {}
        (_, first), (_, last) = self._history[0], self._history[-1]

        def span(get) -> dict[str, float]:
            return {"start": get(first), "end": get(last)}

        return {
            "refusal_score": span(lambda m: float(m.score)),
            "projection": span(lambda m: float(m.projection)),
            "cosine": span(lambda m: m.mean_cosine),
            "projection_drift": float(last.projection - first.projection),
            "checks": len(self._history) - 1,
            "alerts": self._alerts,
            "restored_to_step": self._safe_step if self._restored else None,
            "curve": [{"step": s, "refusal_score": float(m.score), "projection": float(m.projection),
                       "cosine": m.mean_cosine} for s, m in self._history],
        }

    # -- checkpoint state: a resumed run keeps the curve, the alert count and the original baseline (under full
    # fine-tuning the resumed weights are no longer the original model, so prepare() could only re-measure those)
    def state_dict(self) -> dict[str, Any]:
        return {"history": [{"step": s, "cosine": m.cosine.tolist(), "projection": m.projection, "score": m.score}
                            for s, m in self._history],
                "alerts": self._alerts, "safe_step": self._safe_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        rows = state.get("history") or []
        if not rows:
            return
        try:
            history = [(int(r["step"]), Measurement(cosine=torch.tensor([float(x) for x in r["cosine"]]),
                                                    projection=float(r["projection"]), score=float(r["score"])))
                       for r in rows]
        except (KeyError, TypeError, ValueError) as err:
            raise SafeguardRuntimeError(f"monitor: the checkpoint's monitor state is malformed ({err}); resume from "
                                        "a checkpoint written by this plugin version") from err
        if history[0][1].cosine.shape != (len(self._layers),):
            raise SafeguardRuntimeError(f"monitor: the checkpoint's monitor state measured {history[0][1].cosine.numel()} "
                                        f"layers, this artifact selects {len(self._layers)}: resume with the same artifact")
        self._history = history
        self._baseline = history[0][1]
        self._alerts = int(state.get("alerts", 0))
        self._safe_step = int(state.get("safe_step", self._safe_step))

    @classmethod
    def calibrate(cls, ctx: CalibrationContext, artifact) -> None:
        from ...calibration import refusal_direction

        refusal_direction(ctx, artifact)
