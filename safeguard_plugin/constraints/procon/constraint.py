"""The ProCon constraint: the refusal-direction projection penalty."""

from __future__ import annotations

import torch

from ...errors import ConfigError
from ..base import BatchView, CalibrationContext, Constraint, TrainContext
from .config import ProConConfig


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
        from ...modeling import find_decoder_layers

        n = len(find_decoder_layers(model))
        if max(self._layers) >= n:
            raise ConfigError(f"procon: artifact layer {max(self._layers)} does not exist (model has {n} layers)")
        from ...distributed import param_shape

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
    def calibrate(cls, ctx: CalibrationContext, artifact) -> None:
        from ...calibration import refusal_direction

        refusal_direction(ctx, artifact)
