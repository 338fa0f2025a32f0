"""Safety-prompt anchor: keep the original model's first response tokens on prompts outside the training data.

Fine-tuning on data that never shows a harmful prompt (benign instructions, an identity prompt) still moves refusal,
because the gradient of the task loss changes the weights that decide the first tokens of every answer (Qi et al.
2024, "Safety alignment should be made more than just a few tokens deep", arXiv 2406.05946: refusal is decided in
the first few response tokens). A constraint that only sees the training rows (ProCon's projections, the risk-adaptive
KL) cannot hold that; ProCon's authors broaden the constrained data with safety prompts for the same reason. This
constraint does it directly:

    penalty = λ · mean over anchored tokens t of KL_t(π_ref ‖ π_θ)

over a pool of prompts from the calibration sets (harmful *and* harmless by default, so refusal is kept where the
original model refused and helpfulness where it helped), at the first ``tokens`` positions of the original model's
own greedy answer. Before training, one pass with the original weights (PEFT adapters disabled; before the first
update under full fine-tuning) decodes those tokens and stores each position's top-``ref_top_k`` log-probabilities
and the log of the remaining mass; the KL is taken over those ``k + 1`` buckets (exact when the reference's mass is
in its top k; 0 iff the model matches them). At every training micro-batch ``batch_size`` anchor prompts (cycled
through the pool) get one extra forward of the trained weights (``Runtime.policy_hidden``) and the LM head on the
anchored positions only. Cost per micro-batch: a forward and backward of ``batch_size`` short sequences. When every
training row shares a system prompt of its own (``context: data``; found by ``modeling.shared_context``), the pool is
formatted under it, so refusal is held under the prompt the model is trained with (the identity-shifting attack).

Metrics (``safeguard/`` prefix): anchor_kl (mean KL per anchored token), anchor_agree (share of anchored positions
whose most likely token is still the original model's), anchor_loss (the weighted penalty).
"""

from .config import AnchorConfig
from .constraint import Anchor

__all__ = ["Anchor", "AnchorConfig"]
