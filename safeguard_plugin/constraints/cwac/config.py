"""CWAC settings (:class:`CWACConfig`), its artifact components and its error class."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ...errors import SafeguardError
from ..base import CalibrationOptions, ConstraintConfig, PenaltyWeight

SUBSPACE = "cwac_subspace"
SAE = "cwac_sae"
SAE_DIR = "sae"


class CWACError(SafeguardError, ValueError):
    """A CWAC set-up that would not constrain training; the message names the fix."""


class CWACCalibration(CalibrationOptions):
    """``cwac.calibration``: how the subspaces and the SAE are calibrated (the fixed ``rank``, ``sides`` and
    ``target_modules`` stay at the top of the section: training reads them too)."""

    energy: float = Field(0.9, gt=0, le=1, description="Subspace rank = smallest k holding this energy.")
    max_rank: int = Field(16, ge=1, description="Cap on the subspace rank per side.")
    max_prompts: int = Field(128, ge=1, description="Harmful prompts for the gradient subspace.")
    sketch_size: int | None = Field(
        None, ge=1, description="Random-sketch width for the gradient subspace (None: 4·max_rank + 32).")
    sae_layer: int | Literal["auto"] = Field(
        "auto", description="Residual layer for the SAE ('auto': middle of the refusal-direction layers).")
    sae_path: str | None = Field(None, description="An existing SAE folder in SAELens' format.")
    sae_expansion: int = Field(4, ge=1, le=64, description="d_sae = expansion × hidden size.")
    sae_k: int = Field(32, ge=1, description="TopK SAE sparsity.")
    sae_steps: int = Field(300, ge=1, description="SAE optimizer steps (batch 1024 tokens).")
    sae_n_features: int = Field(32, ge=1, description="Safety-critical features stored.")


class CWACConfig(ConstraintConfig):
    # -- weight part
    projection: bool = Field(True, description="Keep weight updates out of the safety subspace (false: SAE term only).")
    subspace: Literal["auto", "alignment", "gradient"] = Field(
        "auto", description="Which calibrated subspace: 'auto' prefers 'alignment' (base-model delta) when present.")
    rank: int | None = Field(None, ge=1, description="Use at most this many stored directions per side (None: all).")
    sides: Literal["both", "left", "right"] = Field("both", description="Project out U (outputs), V (inputs) or both.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Linear layers inside the decoder blocks (suffixes such as 'q_proj').")
    # -- activation part
    sae_weight: PenaltyWeight = Field(1.0, description="λ of the SAE feature term (0: weight projection only).")
    n_features: int | None = Field(None, ge=1, description="Use the first n of the artifact's ranked safety features.")
    normalize: bool = Field(True, description="Divide feature changes by their calibration std.")
    # -- calibration only (changing them needs a new artifact)
    calibration: CWACCalibration = Field(
        default_factory=CWACCalibration,
        description="Options only `safeguard calibrate` (and in-run calibration) reads; changing them needs a new "
                    "artifact.")
