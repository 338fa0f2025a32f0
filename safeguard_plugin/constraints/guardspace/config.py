"""GuardSpace settings (:class:`GuardSpaceConfig`), its artifact component and its error class."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ...errors import SafeguardError
from ..base import CalibrationOptions, ConstraintConfig

COMPONENT = "guardspace"


class GuardSpaceError(SafeguardError, ValueError):
    """A GuardSpace set-up that would not constrain (or not train) the model; the message names the layer."""


class GuardSpaceCalibration(CalibrationOptions):
    """``guardspace.calibration``: how much of the model's activations calibration reads and what it stores
    (``null_energy``, ``damping``, ``massive_share`` and ``min_null_dim`` stay at the top of the section: training
    checks them against the artifact)."""

    max_prompts: int | None = Field(128, ge=1, description="Harmful (train split) prompts used for calibration.")
    calibration_rank: int = Field(32, ge=1, description="Smallest-σ components stored (any r ≤ this can be used).")
    max_covariance_gb: float = Field(3.0, gt=0, description="float64 covariance memory per calibration pass.")


class GuardSpaceConfig(ConstraintConfig):
    rank: int | None = Field(
        None, ge=1, description="LoRA rank r. None: the trainer's existing LoRA rank, else 16.")
    lora_alpha: float | None = Field(
        None, gt=0, description="LoRA alpha. None: the existing adapter's alpha, else 2·r.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Linear layers inside the decoder blocks (suffixes such as 'q_proj'); never lm_head.")
    null_energy: float = Field(
        0.01, ge=0, lt=1, description="Null space = eigen-directions holding the bottom share of harmful-input energy.")
    damping: float = Field(0.01, gt=0, description="C + damping·mean(diag C)·I for the preconditioned SVD.")
    min_null_dim: int | None = Field(
        None, ge=1, description="Fail when a layer's null space is smaller (None: r).")
    max_null_fraction: float = Field(
        0.999, gt=0, le=1, description="Fail when the null space covers more than this share of the input dims "
                                       "(projector ≈ identity: too few calibration tokens).")
    massive_share: float | None = Field(
        None, gt=0.5, lt=1, description="Massive activations: leading directions that each hold more than this "
                                        "share of the energy not yet accounted for are always in the range (blocked) "
                                        "and null_energy applies to the energy left after them (e.g. 0.9; None: off). "
                                        "Calibration and training must use the same value.")
    use_projector: bool = Field(True, description="Apply the null-space projector (false: CorDA-kpm only, ablation).")
    projection: Literal["step", "forward"] = Field(
        "step", description="'step': A ← A·P after every optimizer step (A stays in the null space; no per-forward "
                            "cost; run by the SafeguardCallback / Axolotl plugin). 'forward': lora_A computes (A·P)·x "
                            "in every forward (self-contained: prepare_guardspace_model without the callback).")
    residual: Literal["auto", "weights", "offset"] = Field(
        "auto", description="'weights': W_res in the base weights; 'offset': base untouched (QLoRA); auto picks.")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input (injection path).")
    # calibration only (changing them needs a new artifact)
    calibration: GuardSpaceCalibration = Field(
        default_factory=GuardSpaceCalibration,
        description="Options only `safeguard calibrate` (and in-run calibration) reads; changing them needs a new "
                    "artifact.")


def _config(config) -> GuardSpaceConfig:
    if config is None:
        return GuardSpaceConfig()
    if isinstance(config, GuardSpaceConfig):
        return config
    return GuardSpaceConfig.model_validate(dict(config))
