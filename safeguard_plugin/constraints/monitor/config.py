"""Safety monitor settings (:class:`SafetyMonitorConfig`): cadence, prompts, thresholds and the alert action."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ...errors import ConfigError
from ..base import ConstraintConfig


class SafetyMonitorConfig(ConstraintConfig):
    every_n_steps: int = Field(10, ge=1, description="Measure every N optimizer steps (and at the last step).")
    n_prompts: int = Field(32, ge=1, le=4096, description="Held-out prompts per set used for each measurement.")
    prompts: str = Field("harmful", description="Harmful prompt set spec (shipped name, file or HF id); its held-out part is used.")
    harmless_prompts: str = Field(
        "harmless", description="Harmless comparison prompt set spec for the current refusal direction (held-out part)."
    )
    min_cosine: float | None = Field(
        0.5, ge=-1, le=1,
        description="Alert if the mean cosine between the current and the artifact's refusal direction falls below this.",
    )
    max_score_drop: float | None = Field(
        2.0, ge=0, description="Alert if the mean refusal score (log-odds) on harmful prompts drops by more than this."
    )
    max_projection_shift: float | None = Field(
        None, ge=0, description="Alert if the mean harmful projection on r moves by more than this (calibration std units)."
    )
    action: Literal["warn", "stop", "restore"] = Field(
        "warn", description="On an alert: warn; stop training; or restore the last safe weights and stop."
    )

    @model_validator(mode="after")
    def _need_threshold(self) -> SafetyMonitorConfig:
        if self.min_cosine is None and self.max_score_drop is None and self.max_projection_shift is None:
            raise ConfigError("set at least one of min_cosine, max_score_drop, max_projection_shift")
        return self
