"""Risk-adaptive KL regularisation ("Learning to Stay Safe", arXiv 2602.17546).

Each training example gets a risk score s ∈ [1, 5] (:mod:`safeguard_plugin.risk`: activation probe, LLM judge,
keyword judge, constant, or a third-party estimator) and its own weights

    w_kl = clamp((s − 2) / 3, 0.1, 0.9),   w_sft = clamp(1 − w_kl, 0.1, 0.9),
    loss = Σ_b Σ_{t ∈ resp(b)} [w_sft,b · CE_t + w_kl,b · KL_t(π_ref ‖ π_θ)] / N

over the response tokens (labels != -100, shifted as in the causal-LM loss), N = response tokens in the
micro-batch. With ``risk_floor`` set, an example with s < risk_floor drops its KL term and trains as in plain
SFT (w_sft = 1, w_kl = 0); a micro-batch whose examples are all below the floor costs nothing (no reference
forward, no extra LM-head work), so its step is plain SFT's. Default: no floor (the paper's KL weight never
drops below 0.1).

How it reaches the gradient: the trainer already computes the plain token-mean CE (TRL 1.16 through its fused
LM head, ignoring ``outputs.loss``), so this constraint adds the *correction*

    Σ_t (w_sft,b − 1) · CE_t / N + Σ_t w_kl,b · KL_t / N,

computed from the final hidden states (the final norm's output) through the LM head at the response positions
only, in token chunks with the gradient formed in the same pass (d/dlogits = a·(q − e_y) + c·(q − p_ref)), so
the (tokens × vocab) logits are never materialised; within a chunk everything over the vocabulary is computed in
place in at most three float32 buffers. The engine injects it like every penalty (identity autograd
on the final hidden states, or the mixin's loss). Approximation: the trainer divides CE by the token count of the
whole accumulated batch (``num_items_in_batch``), the correction by the micro-batch's count and by the number of
accumulation steps; the two agree when micro-batches hold equally many response tokens (always at gradient
accumulation 1 on one device), otherwise the weights are per micro-batch rather than per accumulated batch.

Reference policy π_ref (``reference``):

* ``live`` (LoRA / QLoRA; ``auto`` picks it for PEFT models): a no-grad forward of the *same* micro-batch with
  the adapter disabled, only over the rows whose w_kl > 0 and only up to their last response token; exact KL;
  no model copy. It is skipped for micro-batches without such rows.
* ``precomputed`` (full fine-tuning; ``auto`` picks it without PEFT): before the first update, one forward of
  the original weights over every example with w_kl > 0 stores, per response token, the top-``ref_top_k``
  log-probabilities and the log of the remaining mass (keyed by the example's tokens, saved with checkpoints).
  The KL is then taken between the two distributions coarse-grained to {top-k tokens, "everything else"}:
  exact when the reference puts its mass on its top-k (the usual case at k = 32), otherwise a lower bound of the
  full KL that is still 0 iff π_θ matches π_ref on those buckets. Chosen over a frozen copy because a copy
  doubles weight memory (a 7B model in bf16: +14 GB) and adds a forward every step, while the cache costs
  ``8·k`` bytes per risky response token on the CPU (k = 32: 256 B; 1000 examples × 500 tokens ≈ 128 MB)
  and nothing per step. Also usable under LoRA (``reference: precomputed``) to skip the per-batch forward (the
  cheaper choice when the live forward's cost matters: see README "Measured"). An example first seen during
  training (streaming data) gets its cache entry then, from one reference forward of its micro-batch, while the
  original weights are reachable (LoRA: always; full fine-tuning: before the first update; not under ZeRO-3 with
  several ranks); otherwise its KL term is dropped and counted (akl_ref_missing).

Risk scores are computed once per example before training (``precompute``, with a progress bar) and cached by
example hash (the non-padding token ids and the trained-label mask); an example first seen during training
(streaming data) is scored then, while the original weights are reachable. Metrics (``safeguard/`` prefix):
akl_risk_mean, akl_w_kl_mean, akl_kl (token-mean KL), akl_ce (token-mean CE of the weighted tokens),
akl_ref_forwards (reference forwards this logging period), akl_judge_fallbacks (cumulative).
"""


from .config import AdaptiveKLConfig
from .constraint import AdaptiveKL, risk_weights

__all__ = ["AdaptiveKL", "AdaptiveKLConfig", "risk_weights"]
