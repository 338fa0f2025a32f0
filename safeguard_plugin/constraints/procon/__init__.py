"""ProCon (arXiv 2509.06795): keep each training example's projection on the refusal direction.

penalty = λ(t) · mean over examples, layers l, positions p of ((⟨h_θ[l,p], r[l,p]⟩ − ⟨h_θ0[l,p], r[l,p]⟩) / s[l,p])²

* r: unit refusal direction from the artifact; s: pooled std of calibration projections (``normalize``),
  so λ is comparable across layers and models.
* ⟨h_θ0, r⟩ is cached once per distinct prompt (adapter-disabled model under LoRA, or a pre-training
  pass for full fine-tuning): no second model copy, no extra forward per step.
* λ(t): ``weight × warmup_factor`` during warm-up (the first ``warmup_steps`` or ``warmup_ratio`` of the
  run), then ``weight``; ``schedule: linear`` decays from one to the other over the warm-up instead.
"""


from .config import ProConConfig
from .constraint import ProCon

__all__ = ["ProCon", "ProConConfig"]
