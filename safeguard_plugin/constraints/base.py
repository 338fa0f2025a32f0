"""The constraint interface: the moments of a training run a method may act in.

| moment          | when                                        | method                                      |
|-----------------|---------------------------------------------|---------------------------------------------|
| calibrate       | offline, once per model                     | ``calibrate(ctx)`` adds components          |
| surgery         | engine.setup, before the optimizer exists   | ``modify_model``                            |
| prepare         | model exists, before the first step         | ``validate_model``, ``prepare``             |
| reference       | once per distinct prompt, original weights  | ``reference_values(acts)`` (cached)         |
| penalty         | every training micro-batch forward          | ``penalty(batch)`` -> scalar tensor         |
| after_step      | after each optimizer step                   | ``after_step(ctx)``                         |
| metrics         | at each logging step                        | ``metrics()``                               |

The engine owns hooks, caching, gradient-accumulation scaling, NaN guarding and logging; a constraint
only does its maths.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from ..artifacts import Artifact
    from ..engine import SafeguardEngine


class ConstraintConfig(BaseModel):
    """Base for every constraint's config section; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Set false to keep the section but switch the constraint off.")


@dataclass
class TrainContext:
    """What a constraint sees outside the forward pass."""

    model: torch.nn.Module
    engine: SafeguardEngine
    max_steps: int = 0
    global_step: int = 0


@dataclass
class BatchView:
    """One training micro-batch, as seen at the engine's last hooked layer.

    ``acts[layer]`` is ``(B, P, d)``: decoder-layer outputs at the ``P`` post-instruction positions of
    each example (with autograd graph). ``valid`` marks rows whose positions were found; ``reference``
    holds each constraint's cached original-model values for those rows (``(B, ...)``).
    """

    input_ids: torch.Tensor
    acts: dict[int, torch.Tensor]
    valid: torch.Tensor
    reference: dict[str, torch.Tensor] = field(default_factory=dict)
    ref_valid: torch.Tensor | None = None
    global_step: int = 0
    max_steps: int = 0


class Constraint:
    """Base class. Subclasses set ``name``, ``config_class`` and ``requires`` and override what they need."""

    name: ClassVar[str]
    config_class: ClassVar[type[ConstraintConfig]] = ConstraintConfig
    requires: ClassVar[tuple[str, ...]] = ()  # artifact components
    uses_reference: ClassVar[bool] = False

    def __init__(self, config: ConstraintConfig, artifact: Artifact | None):
        self.config = config
        self.artifact = artifact
        if self.requires and artifact is None:
            raise ValueError(
                f"constraint '{self.name}' needs a calibration artifact (components: {', '.join(self.requires)}); "
                "set `artifact:` to the folder written by `safeguard calibrate`"
            )
        for comp in self.requires:
            artifact.component(comp)  # raises a clear ArtifactError when missing

    # -- benchmark
    @classmethod
    def benchmark_configs(cls) -> dict[str, dict]:
        """``{row label: config section}`` rows this constraint contributes to ``safeguard bench`` (none by default)."""
        return {}

    # -- calibration (offline)
    @classmethod
    def calibrate(cls, ctx: Any, artifact: Artifact) -> None:
        """Add this constraint's components to ``artifact`` (see :mod:`safeguard_plugin.calibration`)."""

    # -- before training
    def layers(self) -> list[int]:
        """Decoder layers whose outputs the penalty needs (empty: no penalty)."""
        return []

    def validate_model(self, model: torch.nn.Module) -> None:
        """Raise before step 1 if the artifact does not fit the model (layers, dimensions)."""

    def modify_model(self, model: torch.nn.Module) -> None:
        """In-place model surgery (e.g. adapter initialisation), run by ``engine.setup`` before the optimizer
        exists. Must keep the same top-level model object, since the trainer already holds a reference to it."""

    def prepare(self, ctx: TrainContext) -> None:
        """Model surgery / precomputation before the optimizer's first step."""

    # -- training
    def reference_values(self, acts: dict[int, torch.Tensor]) -> torch.Tensor:
        """Values to cache per example from original-model activations ``{layer: (n, P, d)}`` -> ``(n, ...)``."""
        raise NotImplementedError

    def penalty(self, batch: BatchView) -> torch.Tensor | None:
        """Scalar penalty for this micro-batch (already weighted), or None when it does not apply."""
        return None

    def after_step(self, ctx: TrainContext) -> None:
        """Exact weight edits after each optimizer step."""

    def metrics(self) -> dict[str, float]:
        """Metrics since the last call (names without the ``safeguard/`` prefix)."""
        return {}

    # -- state saved with Trainer checkpoints (schedules derive from global_step, so usually nothing)
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
