"""CWAC (arXiv 2604.12384): coupled weight-subspace and SAE safety-feature constraints.

Weight part — a safety subspace per target weight matrix ``W (d_out × d_in)``: a left basis ``U (d_out × k)`` and a
right basis ``V (d_in × k)``. Training updates are kept out of it exactly, after every optimizer step:

* full fine-tuning: ``ΔW ← (I − UUᵀ) ΔW (I − VVᵀ)`` with ``ΔW = W − W₀``. Only ``UᵀW₀`` and ``W₀V`` are kept
  (``k·(d_in + d_out)`` numbers per matrix, not a copy of ``W₀``), so the edit is
  ``W ← W − U a − b Vᵀ + U (a V) Vᵀ`` with ``a = UᵀW − UᵀW₀``, ``b = WV − W₀V``. Projecting the *update* after the
  step (not the gradient before Adam) is exact: nothing leaks through Adam's moments.
* LoRA: ``B ← (I − UUᵀ) B`` and ``A ← A (I − VVᵀ)``, so ``Uᵀ(BA) = 0`` and ``(BA)V = 0``.

Where the subspace comes from (calibration, stored in the artifact as low-rank factors):

* ``alignment``: top singular vectors of ``W_aligned − W_base`` (needs the pre-alignment base model; Safe LoRA /
  AsFT style).
* ``gradient``: from the aligned model alone. For each harmful prompt i paired with a refusal, the per-example
  gradient of the refusal log-likelihood is ``G_i = Σ_t δ_t x_tᵀ``; U / V are the top eigenvectors of
  ``Σ_i G_i G_iᵀ`` / ``Σ_i G_iᵀ G_i`` (the weight directions along which the refusal likelihood changes most).
  They are found from a single-pass randomised sketch (Nyström) without ever forming a ``G_i``.
  Rank: fixed ``rank`` or the smallest k holding ``calibration.energy`` of the (exact) trace, capped at
  ``calibration.max_rank``.

Activation part — an SAE on one residual-stream layer (trained at calibration, or an existing SAELens SAE). The
safety-critical features S are the top ``n_features`` by |mean activation harmful − harmless| at the
post-instruction positions. Penalty (per micro-batch, examples whose post-instruction tokens are present):

    λ · mean_examples Σ_{j∈S} mean_positions ((f_j(h_θ) − f_j(h_θ₀)) / s_j)²

with ``s_j`` the feature's calibration std at those positions (RMS over positions; ``normalize``).
``f_j(h_θ₀)`` is cached once per distinct prompt from
the original weights (adapter-disabled model under LoRA, a pre-training pass for full fine-tuning).
Reading the features at the post-instruction positions — where the model decides to refuse — is what makes the
reference cacheable, so the term costs no second forward.
"""


from .calibrate import alignment_subspaces, calibrate_sae, gradient_subspaces, nystrom_eig, target_linears
from .config import SAE, SAE_DIR, SUBSPACE, CWACConfig, CWACError
from .constraint import CWAC

__all__ = ["CWAC", "SAE", "SAE_DIR", "SUBSPACE", "CWACConfig", "CWACError", "alignment_subspaces", "calibrate_sae",
           "gradient_subspaces", "nystrom_eig", "target_linears"]
