"""An example constraint, added by following docs/adding-a-constraint.md and nothing else: this package and its
entry point (``../safeguard_l2_anchor-0.1.dist-info/entry_points.txt``) are all there is. The tests put this folder
on ``sys.path`` (tests/conftest.py), so the registry finds it like any installed third-party constraint, and the
tests that iterate the registry (DeepSpeed equivalence, the fuzz test, the bench's method list) cover it unedited.

L2 anchor: keeps the trained weights near their values at the start of training. After every optimizer step each
trainable parameter is pulled back towards its starting value θ₀ with the proximal step of the penalty
(pull/2)·‖θ − θ₀‖²: θ ← θ₀ + (θ − θ₀) / (1 + pull). The edit goes through ``get_full_param`` / ``set_full_param``,
so it is exact on the fp32 master weights under DeepSpeed ZeRO-2/3 too.
"""

from __future__ import annotations

import torch
from pydantic import Field

from safeguard_plugin.constraints.base import Constraint, ConstraintConfig, TrainContext
from safeguard_plugin.distributed import get_full_param, set_full_param


class L2AnchorConfig(ConstraintConfig):
    pull: float = Field(0.1, gt=0, le=10, description="Proximal strength: θ ← θ₀ + (θ − θ₀) / (1 + pull) per step.")


class L2Anchor(Constraint):
    """Pulls the trainable weights back towards their values at train begin after every optimizer step."""

    name = "l2_anchor"
    config_class = L2AnchorConfig

    def __init__(self, config: L2AnchorConfig, artifact):
        super().__init__(config, artifact)
        self._params: list[torch.nn.Parameter] = []
        self._anchor: list[torch.Tensor] = []
        self._distance = 0.0

    def prepare(self, ctx: TrainContext) -> None:
        # collective under DeepSpeed: every rank reads the same parameters in the same order
        self._params = [p for p in ctx.model.parameters() if p.requires_grad]
        self._anchor = [get_full_param(p).detach().float().clone() for p in self._params]

    def after_step(self, ctx: TrainContext) -> None:
        num = den = 0.0
        for p, p0 in zip(self._params, self._anchor):
            w = get_full_param(p).float()
            pulled = p0 + (w - p0) / (1.0 + self.config.pull)
            set_full_param(p, pulled)
            num += float(((pulled - p0) ** 2).sum())
            den += float((p0 ** 2).sum())
        self._distance = (num / max(den, 1e-12)) ** 0.5

    def metrics(self) -> dict[str, float]:
        return {"l2_anchor_distance": self._distance}
