"""Anchor settings (:class:`AnchorConfig`): strength, the anchored prompts and tokens, the reference cache."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..base import ConstraintConfig, PenaltyWeight


class AnchorConfig(ConstraintConfig):
    weight: PenaltyWeight = Field(3.0, description="λ on the mean KL(π_ref ‖ π_θ) per anchored token.")
    prompts: list[str] = Field(
        default_factory=lambda: ["harmful", "harmless"], min_length=1,
        description="Prompt sets whose train split is the anchor pool (shipped names, .jsonl/.json/.csv files or HF "
                    "dataset ids, as in `safeguard calibrate --harmful/--harmless`); drawn from in turn.")
    pool_size: int = Field(128, ge=1, description="Anchor prompts kept (taken in turn from the sets).")
    tokens: int = Field(8, ge=1, le=64, description="Response tokens anchored per prompt: the original model's first "
                                                   "greedy tokens, where refusal is decided.")
    batch_size: int = Field(4, ge=1, description="Anchor prompts per training micro-batch (cycled through the pool).")
    ref_top_k: int = Field(32, ge=1, description="Reference log-probs kept per anchored token (plus the remaining mass).")
    seed: int = Field(0, description="Order in which the pool is cycled.")
    context: Literal["data", "template"] = Field(
        "data", description="How anchor prompts are formatted. 'data': under the header (system prompt) that every "
                            "training row shares, when they share one the chat template does not add itself (found "
                            "from the rows, logged), else as 'template'; 'template': the chat template's own rendering "
                            "of a single user message.")

    def noop_reason(self) -> str | None:
        if self.weight == 0:
            return ("anchor.weight is 0: the anchor adds no penalty, so this run trains exactly as it would without "
                    "the anchor section; set a weight > 0 (default 3) or remove the section")
        return None
