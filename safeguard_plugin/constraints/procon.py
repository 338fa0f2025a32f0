"""ProCon (arXiv 2509.06795): keep each training example's projection on the refusal direction.

penalty = λ(t) · mean over examples, layers l, positions p of ((⟨h_θ[l,p], r[l,p]⟩ − ⟨h_θ0[l,p], r[l,p]⟩) / s[l,p])²

* r: unit refusal direction from the artifact; s: pooled std of calibration projections (``normalize``),
  so λ is comparable across layers and models.
* ⟨h_θ0, r⟩ is cached once per distinct prompt (adapter-disabled model under LoRA, or a pre-training
  pass for full fine-tuning): no second model copy, no extra forward per step.
* λ(t): ``weight × warmup_factor`` during warm-up (the first ``warmup_steps`` or ``warmup_ratio`` of the
  run), then ``weight``; ``schedule: linear`` decays from one to the other over the warm-up instead.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from ..errors import ConfigError
from .base import BatchView, Constraint, ConstraintConfig, PenaltyWeight, TrainContext, check_effective_weight


class ProConConfig(ConstraintConfig):
    weight: PenaltyWeight = Field(100.0, description="λ after warm-up (penalty on std-normalised projections).")
    warmup_ratio: float = Field(0.1, ge=0, le=1, description="Fraction of the run with the strong constraint.")
    warmup_steps: int | None = Field(None, ge=0, description="Warm-up length in optimizer steps (overrides the ratio).")
    warmup_factor: float = Field(10.0, ge=1, description="λ multiplier during warm-up.")
    schedule: Literal["step", "linear"] = Field("step", description="Warm-up shape: constant then drop, or linear decay.")
    layers: list[int] | Literal["auto", "all"] = Field(
        "auto", description="Layers to constrain: 'auto' = the artifact's selected layers, 'all', or a list."
    )
    positions: Literal["selected", "last", "all"] = Field(
        "selected", description="Post-instruction positions: the artifact's best one, the last one, or all."
    )
    normalize: bool = Field(True, description="Divide projection changes by their calibration std.")

    @model_validator(mode="after")
    def _warmup_weight_fits(self) -> ProConConfig:
        check_effective_weight(f"weight × warmup_factor ({self.weight:g} × {self.warmup_factor:g}, the λ during warm-up)",
                               self.weight * self.warmup_factor)
        return self

    def noop_reason(self) -> str | None:
        if self.weight == 0:
            return ("procon.weight is 0: ProCon adds no penalty, so this run trains exactly as it would without the "
                    "procon section; set a weight > 0 (default 100) or remove the section")
        return None


class ProCon(Constraint):
    name = "procon"
    config_class = ProConConfig
    requires = ("refusal_direction",)
    uses_reference = True

    def __init__(self, config: ProConConfig, artifact):
        super().__init__(config, artifact)
        tensors, meta = artifact.component("refusal_direction")
        L, P = meta["num_layers"], meta["num_positions"]
        if config.layers == "auto":
            layers = list(meta["selected_layers"])
        elif config.layers == "all":
            layers = list(range(L))
        else:
            bad = [x for x in config.layers if not 0 <= x < L]
            if bad:
                raise ConfigError(f"procon.layers: {bad} out of range; the artifact has layers 0..{L - 1}")
            layers = sorted(set(config.layers))
        if not layers:
            raise ConfigError("procon.layers: no layer selected")
        self._layers = layers
        if config.positions == "selected":
            self._pos = [int(meta["selected_position"])]
        elif config.positions == "last":
            self._pos = [P - 1]
        else:
            self._pos = list(range(P))
        li, pi = torch.tensor(self._layers), torch.tensor(self._pos)
        self.r = tensors["direction"][li][:, pi].float()  # (nL, nP, d)
        self.s = tensors["std"][li][:, pi].float() if config.normalize else torch.ones(len(li), len(pi))
        self._sum_pen = 0.0
        self._sum_drift = torch.zeros(len(layers))
        self._n = 0
        self._lam = config.weight

    def layers(self) -> list[int]:
        return self._layers

    def validate_model(self, model: torch.nn.Module) -> None:
        from ..modeling import find_decoder_layers

        n = len(find_decoder_layers(model))
        if max(self._layers) >= n:
            raise ConfigError(f"procon: artifact layer {max(self._layers)} does not exist (model has {n} layers)")
        from ..distributed import param_shape

        d = param_shape(model.get_input_embeddings().weight)[-1]
        if self.r.shape[-1] != d:
            raise ConfigError(f"procon: artifact direction has dimension {self.r.shape[-1]}, the model's hidden size is {d}")

    def warmup_len(self, max_steps: int) -> int:
        if self.config.warmup_steps is not None:
            return self.config.warmup_steps
        return int(round(self.config.warmup_ratio * max_steps))

    def lam(self, step: int, max_steps: int) -> float:
        c = self.config
        w = self.warmup_len(max_steps)
        if step >= w or c.warmup_factor == 1:
            return c.weight
        if c.schedule == "step":
            return c.weight * c.warmup_factor
        return c.weight * (c.warmup_factor + (1 - c.warmup_factor) * step / max(1, w))

    def _project(self, acts: dict[int, torch.Tensor]) -> torch.Tensor:
        # acts[l]: (n, P, d) -> (n, nL, nP)
        r = self.r.to(next(iter(acts.values())).device)
        h = torch.stack([acts[layer][:, self._pos] for layer in self._layers], 1).float()
        return torch.einsum("nlpd,lpd->nlp", h, r)

    def reference_values(self, acts: dict[int, torch.Tensor]) -> torch.Tensor:
        return self._project(acts)

    def penalty(self, batch: BatchView) -> torch.Tensor | None:
        mask = batch.ref_valid if batch.ref_valid is not None else batch.valid
        if not bool(mask.any()):
            return None
        proj = self._project(batch.acts)[mask]
        ref = batch.reference[self.name][mask].to(proj.device)
        z = (proj - ref) / self.s.to(proj.device)
        lam = self.lam(batch.global_step, batch.max_steps)
        if batch.global_rows is None:
            pen = lam * z.pow(2).mean()
        else:  # several ranks: sum / (global rows / world size), so the rank-averaged gradient is the whole batch's
            pen = lam * z.pow(2).sum() / (batch.rows_denominator(z.shape[0]) * z.shape[1] * z.shape[2])
        with torch.no_grad():
            self._sum_pen += float(pen)
            self._sum_drift += z.abs().mean(dim=(0, 2)).cpu()
            self._n += 1
            self._lam = lam
        return pen

    def prepare(self, ctx: TrainContext) -> None:
        self._lam = self.lam(ctx.global_step, ctx.max_steps)

    def metrics(self) -> dict[str, float]:
        out = {"procon_lambda": self._lam}
        if self._n:
            out["procon_loss"] = self._sum_pen / self._n
            drift = self._sum_drift / self._n
            out["procon_drift"] = float(drift.mean())
            out.update({f"procon_drift_l{layer}": float(d) for layer, d in zip(self._layers, drift)})
        self._sum_pen, self._sum_drift, self._n = 0.0, torch.zeros(len(self._layers)), 0
        return out

    @classmethod
    def benchmark_configs(cls) -> dict[str, dict]:
        return {"procon": {"weight": 100.0, "warmup_ratio": 0.1, "warmup_factor": 10.0}}

    @classmethod
    def calibrate(cls, ctx, artifact) -> None:
        from ..calibration import refusal_direction

        refusal_direction(ctx, artifact)
