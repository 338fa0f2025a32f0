"""Adaptive KL settings (:class:`AdaptiveKLConfig`): the risk estimator and the reference policy."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from ...config import errors_at
from ...errors import ConfigError
from ...risk import available_risk_estimators, get_risk_estimator
from ..base import ConstraintConfig


class AdaptiveKLConfig(ConstraintConfig):
    risk: str = Field("probe", description="Risk estimator: probe | judge | keyword | constant | a registered third-party one.")
    risk_options: dict[str, Any] = Field(
        default_factory=dict, description="The estimator's own settings, e.g. {model: <chat model>} for judge, {score: 5} "
                                          "for constant.")
    risk_floor: float | None = Field(
        None, ge=1, le=5, description="Examples with s below this drop the KL term and train as plain SFT (no reference "
                                      "forward). None (default, as the paper): KL weight never below 0.1.")
    weight_bounds: list[float] = Field(
        default_factory=lambda: [0.1, 0.9], min_length=2, max_length=2, description="Clamp range (lo, hi) of both weights: w_kl = clamp((s-2)/3), w_sft = clamp(1 - w_kl). "
                                "The paper's (0.1, 0.9) still trains a risk-5 example at w_sft 0.1; (0, 1) drops its "
                                "SFT term and keeps only the KL to the reference.")
    reference: Literal["auto", "live", "precomputed"] = Field(
        "auto", description="π_ref: 'live' = adapter-disabled forward per batch (PEFT only), 'precomputed' = top-k "
                            "reference log-probs cached before training; 'auto' = live for PEFT, precomputed otherwise.")
    ref_top_k: int = Field(32, ge=1, description="Reference log-probs kept per response token ('precomputed').")
    missing_risk: float = Field(
        5.0, ge=1, le=5, description="Score for an example that cannot be scored any more (full fine-tuning, first seen "
                                     "after the first update, with a probe): high risk, recall first. Counted.")
    chunk_tokens: int | None = Field(None, ge=1, description="Response tokens per LM-head chunk (default: 2^23 / vocab).")
    score_context: Literal["template", "data"] = Field(
        "template", description="What the risk estimator reads. 'template' (default): each row with the header (system "
                                "prompt) that every training row shares, if they share one the chat template does not "
                                "add itself, replaced by the template's own, as the probe was calibrated: a prompt "
                                "common to all rows tells no row from another, and it moves every probe score alike "
                                "(the anchor keeps refusal under it). 'data': the rows as they are.")

    @model_validator(mode="after")
    def _check_risk(self) -> AdaptiveKLConfig:
        lo, hi = self.weight_bounds
        if not 0 <= lo <= 0.5 <= hi <= 1:
            raise ConfigError(f"weight_bounds: need 0 <= lo <= 0.5 <= hi <= 1, got [{lo:g}, {hi:g}]")
        try:
            cls = get_risk_estimator(self.risk)
        except ConfigError:
            raise ConfigError(f"risk: unknown estimator '{self.risk}'; registered: "
                             f"{', '.join(available_risk_estimators())}") from None
        try:
            cls.config_class.model_validate(self.risk_options, strict=True)
        except ValidationError as err:  # errors name risk_options' keys: adaptive_kl.risk_options.<key>
            raise ValidationError.from_exception_data(type(self).__name__, errors_at(err, "risk_options")) from None
        return self

    def no_penalty_reason(self) -> str | None:
        if self.risk_floor is not None:
            return (f"every training example scored below adaptive_kl.risk_floor ({self.risk_floor:g}), so all of them "
                    "trained as plain SFT, as configured")
        if self.weight_bounds[0] == 0:
            return ("every training example scored risk 2 or less, which with adaptive_kl.weight_bounds "
                    f"{list(self.weight_bounds)} means w_kl = 0: all of them trained as plain SFT, as configured")
        return None
