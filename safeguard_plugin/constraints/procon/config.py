"""ProCon settings (:class:`ProConConfig`): weight, warm-up, layers and positions."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..base import ConstraintConfig, PenaltyWeight, check_effective_weight


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
