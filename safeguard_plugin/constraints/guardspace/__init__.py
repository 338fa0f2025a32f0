"""GuardSpace (arXiv 2510.14301): safety-preserving LoRA through a guard subspace and a harmful-resistant null space.

Calibration (offline, harmful prompts only), per target ``nn.Linear`` inside the decoder blocks (never ``lm_head``):

* C = E[x xᵀ] over the layer's inputs on harmful prompts: hooks on the Linear inputs, padding masked out,
  batched products accumulated in float64. Layers that read the same tensor (q/k/v, gate/up) share one C.
* CorDA "kpm" decomposition (PEFT's ``peft.tuners.lora.corda``, same maths, same ``CordaEigens`` layout):
  C_d = C + damping·mean(diag C)·I, SVD of W·C_d = U Σ Vᵀ, Ṽ = C_d⁻¹ V. The large-σ components are the
  safety-relevant part (frozen); the last (smallest-σ) ``calibration.calibration_rank`` components are stored.
* Null space: eigen-directions of C holding the bottom ``null_energy`` share of its energy (plus numerically-zero
  ones, λ ≤ max(1e-8, 1e-6·λ_max)). The artifact stores the complement (the range basis R, top eigenvectors,
  with their eigenvalues); P = I − R Rᵀ, so any ``null_energy`` ≥ the calibrated one can be used at train time.

Model surgery (``modify_model``; PEFT does the LoRA part):

* plain model (no ``peft_config`` in the trainer): ``peft.inject_adapter_in_model(LoraConfig(init_lora_weights=
  "corda", ...))`` in place (same top-level object); the base is frozen.
* model that already has PEFT LoRA adapters (``peft_config`` passed to the trainer, Axolotl ``adapter: lora``):
  each adapter is re-initialised in place with PEFT's ``corda_init`` (rank and alpha of the existing adapter).
* Init: A₀ = Σ_r^½ (P Ṽ_r)ᵀ, B₀ = U_r Σ_r^½ (PEFT's convention, alpha folded in); residual weight
  W_res = W − s·B₀A₀ (computed by PEFT's ``corda_init``), so the output is unchanged at step 0.
* Projector on the adapter input, ``projection="step"`` (default under the callback / Axolotl plugin): A starts in
  the null space and after every optimizer step A ← A P = A − (A R) Rᵀ (for inputs ≤ 512 dims a shared d×d P),
  written to the fp32 master copy under DeepSpeed; the forward is a plain LoRA product, so the projector costs one
  r×d×m product per layer per optimizer step, nothing per forward or per token. ``projection="forward"``
  (``prepare_guardspace_model`` alone) computes (A P)·x in every forward instead. Either way the effective weight
  during training is W + s·(B A − B₀ A₀)·P, i.e. every update is confined to the null space of the harmful-prompt
  inputs (the two differ only in what the optimizer sees: G vs G·P).
* Disabling the adapter (``disable_adapter()``, used by the engine for reference values) gives back the original
  model: the frozen init part s·B₀A₀P is added back to W_res.
* ``residual="offset"`` (automatic for quantized/QLoRA base weights): the base weights are not touched; the layer
  subtracts s·B₀A₀P x instead (one extra rank-r product per token).

Calibration cost: the chat-template prefix shared by all prompts is counted once (weight N, exact); LAPACK runs
single-threaded (multi-threaded ``eigh`` was 4-10x slower on a busy 2-core machine); large inputs (MLP down_proj)
get their range basis from a randomized range finder. Qwen2.5-0.5B, 128 prompts, 2 cores: 3.5 min (7 min with
the machine shared), peak RSS 5.3 GB, artifact 463 MB (mostly the down_proj range bases).

Usage (TRL): ``SFTTrainer(model=base, ..., callbacks=[SafeguardCallback({"artifact": dir, "guardspace": {}})])``
(no ``peft_config``: the adapters are injected in ``on_init_end``, before the optimizer exists; with a
``peft_config`` the trainer's LoRA is converted in place), or ``prepare_guardspace_model(model, dir, rank=16)``.

Save / reload / deploy: :func:`save_guardspace` writes ``guardspace.safetensors`` + ``guardspace.json`` (trainable
factors, projector basis, init factors; the residual is recomputed from the base weights on load, so the folder
stays small) **and** a standard PEFT LoRA adapter of rank 2r on the original base weights
(B' = [B, −B₀], A' = [A P; A₀ P]) that vanilla ``PeftModel.from_pretrained`` / ``load_adapter`` / serving stacks load
with identical outputs — a loader that knows nothing about GuardSpace cannot drop the projector. :func:`load_guardspace`
restores the trainable GuardSpace model; :func:`merge_guardspace` merges W_res + s·B·A·P into the base weights.
"""


from .calibrate import calibrate_guardspace, compute_guardspace
from .config import COMPONENT, GuardSpaceConfig, GuardSpaceError
from .constraint import GuardSpace, prepare_guardspace_model
from .io import (
    SAVE_META,
    SAVE_TENSORS,
    load_guardspace,
    merge_guardspace,
    restore_guardspace_factors,
    save_guardspace,
)
from .layer import GuardSpaceLayerMixin, NullSpaceLoraA, guardspace_layers

__all__ = [
    "COMPONENT", "SAVE_META", "SAVE_TENSORS", "GuardSpace", "GuardSpaceConfig", "GuardSpaceError",
    "GuardSpaceLayerMixin", "NullSpaceLoraA", "calibrate_guardspace", "compute_guardspace", "guardspace_layers",
    "load_guardspace", "merge_guardspace", "prepare_guardspace_model", "restore_guardspace_factors", "save_guardspace",
]
