"""GuardSpace (arXiv 2510.14301): safety-preserving LoRA through a guard subspace and a harmful-resistant null space.

Calibration (offline, harmful prompts only), per target ``nn.Linear`` inside the decoder blocks (never ``lm_head``):

* C = E[x xᵀ] over the layer's inputs on harmful prompts: hooks on the Linear inputs, padding masked out,
  batched products accumulated in float64. Layers that read the same tensor (q/k/v, gate/up) share one C.
* CorDA "kpm" decomposition (PEFT's ``peft.tuners.lora.corda``, same maths, same ``CordaEigens`` layout):
  C_d = C + damping·mean(diag C)·I, SVD of W·C_d = U Σ Vᵀ, Ṽ = C_d⁻¹ V. The large-σ components are the
  safety-relevant part (frozen); the last (smallest-σ) ``calibration_rank`` components are stored.
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

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..errors import SafeguardError, SafeguardRuntimeError
from .base import Constraint, ConstraintConfig, TrainContext

logger = logging.getLogger("safeguard_plugin")

COMPONENT = "guardspace"
SAVE_TENSORS = "guardspace.safetensors"
SAVE_META = "guardspace.json"
_DEDUP_PREFIX = True  # count the prompts' common prefix once (weight N); switch for tests
EXACT_EIGH_MAX = 2048  # larger covariances use a randomized range finder (the range side is the small one)


class GuardSpaceError(SafeguardError, ValueError):
    """A GuardSpace set-up that would not constrain (or not train) the model; the message names the layer."""


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
    # calibration-only
    max_prompts: int | None = Field(128, ge=1, description="Harmful (train split) prompts used for calibration.")
    calibration_rank: int = Field(32, ge=1, description="Smallest-σ components stored (any r ≤ this can be used).")
    max_covariance_gb: float = Field(3.0, gt=0, description="float64 covariance memory per calibration pass.")


# ================================================================================================ calibration
def _target_linears(model: nn.Module, targets) -> list[tuple[int, str, nn.Module]]:
    """``[(layer index, in-block name, Linear)]`` for the configured targets (decoder blocks only)."""
    from ..modeling import find_decoder_layers

    out = []
    for i, block in enumerate(find_decoder_layers(model)):
        for name, mod in block.named_modules():
            if "lora_" in name or name.endswith("base_layer"):
                continue
            if _is_lora_layer(mod):
                raise GuardSpaceError("guardspace calibration needs the base model, without PEFT adapters")
            if not isinstance(mod, nn.Linear):
                continue
            if targets != "all-linear" and not any(name == t or name.endswith("." + t) for t in targets):
                continue
            out.append((i, name, mod))
    if not out:
        raise GuardSpaceError(f"guardspace: no nn.Linear inside the decoder blocks matches target_modules={targets}")
    return out


def CordaEigens(S_WC: torch.Tensor, U_WC: torch.Tensor, V_WC: torch.Tensor):  # noqa: N802
    """The ``eigens`` record PEFT's ``corda_init`` reads (``peft.tuners.lora.corda.CordaEigens``; that module needs
    the undeclared ``attrs`` package, so the same three fields are given here)."""
    from types import SimpleNamespace

    return SimpleNamespace(S_WC=S_WC, U_WC=U_WC, V_WC=V_WC)


def _is_lora_layer(mod: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(mod, LoraLayer)


class _Covariances:
    """Forward pre-hooks accumulating Σ w·x xᵀ (float64) per distinct input tensor; w: per-position weight
    (0 for padding)."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.group_of: dict[str, int] = {}
        self.acc: list[torch.Tensor] = []
        self.count: list[float] = []
        self.keep: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None
        self.total = 0.0
        self._last: tuple[torch.Tensor | None, int] = (None, -1)
        self._done: set[int] = set()
        self._first = True
        self.handles = [m.register_forward_pre_hook(self._hook(k)) for k, m in modules.items()]

    def new_batch(self, weights: torch.Tensor) -> None:
        w = weights.reshape(-1)
        self.keep = w > 0
        self.scale = w[self.keep].sqrt()
        self.total = float(w.sum())
        self._last, self._done = (None, -1), set()

    def end_batch(self) -> None:
        self._first = False
        self._last = (None, -1)

    def _hook(self, key: str):
        def hook(_mod, args):
            x = args[0]
            last_x, last_g = self._last
            if x is last_x:  # same tensor as the previous target (q/k/v, gate/up): one covariance
                if self._first:
                    self.group_of[key] = last_g
                elif self.group_of.get(key) != last_g:
                    raise SafeguardRuntimeError(f"guardspace calibration: input sharing of '{key}' changed between batches")
                return
            g = self.group_of.get(key)
            if g is None:
                if not self._first:
                    raise SafeguardRuntimeError(f"guardspace calibration: '{key}' was not called in the first batch")
                g = len(self.acc)
                self.group_of[key] = g
                self.acc.append(torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64, device=x.device))
                self.count.append(0.0)
            if g in self._done:
                raise SafeguardRuntimeError(f"guardspace calibration: '{key}' input seen twice in one forward")
            self._done.add(g)
            rows = x.reshape(-1, x.shape[-1])[self.keep.to(x.device)]
            # batched product in float32 (float64 when the model runs in float64), accumulated in float64
            dt = torch.float64 if x.dtype == torch.float64 else torch.float32
            rows = rows.to(dt) * self.scale.to(device=x.device, dtype=dt)[:, None]
            self.acc[g].add_((rows.T @ rows).to(torch.float64))
            self.count[g] += self.total
            self._last = (x, g)

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


class _one_thread:
    """Single-threaded LAPACK (eigh, QR, Cholesky, SVD); matrix products keep all threads. On a busy 2-core
    machine OpenMP barriers made multi-threaded ``eigh`` 10-100x slower (4864²: 80 s vs 18 s single-threaded)."""

    def __enter__(self):
        self.prev = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.prev)


def _null_tol(lam_max: float) -> float:
    return max(1e-8, 1e-6 * lam_max)


def _n_massive(ev_desc: torch.Tensor, trace: float, massive: float | None) -> int:
    """Number of leading eigenvalues that each hold more than ``massive`` of the energy not yet accounted for."""
    k, rest = 0, trace
    if massive is not None:
        for lam in ev_desc.tolist()[:64]:
            if lam <= massive * rest:
                break
            rest -= lam
            k += 1
    return k


def _range_size(ev_desc: torch.Tensor, trace: float, energy: float, lam_max: float,
                massive: float | None = None) -> tuple[int, int, float]:
    """(m, n_pos, need). need: the energy the range must hold, (1 − energy) of the trace; with ``massive``, all of
    the leading directions that each hold more than ``massive`` of the energy not yet accounted for, plus
    (1 − energy) of what is left. m: the smallest number of top eigenvalues holding it, capped at n_pos, the
    eigenvalues that are not numerically zero (relative to the largest one after the massive ones)."""
    k = _n_massive(ev_desc, trace, massive)
    need = trace - energy * (trace - float(ev_desc[:k].sum()))
    if not ev_desc.numel():
        return 0, 0, need
    n_pos = int((ev_desc > _null_tol(float(ev_desc[k]) if k < ev_desc.numel() else lam_max)).sum())
    cum = torch.cumsum(ev_desc, 0)
    m = int(torch.searchsorted(cum, torch.tensor([need], dtype=cum.dtype)).item()) + 1
    return min(m, n_pos, ev_desc.numel()), n_pos, need


@torch.no_grad()
def _range_basis(C: torch.Tensor, energy: float, seed: int = 0, hint: int | None = None,
                 massive: float | None = None) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Top eigenvectors R (d×m, descending) of C holding ≥ (1−energy) of its trace (with ``massive``: see
    :func:`_range_size`): (R, eigenvalues, trace, λ_max).

    Exact ``eigh`` up to ``EXACT_EIGH_MAX``; above it a randomized range finder (power iterations + Rayleigh–Ritz)
    whose block (started from ``hint``, e.g. the previous layer's m) grows until the criterion is met. Either way
    the energy left in the null space, trace − Σ kept eigenvalues, is exact (R is orthonormal); only m may exceed
    the optimum slightly.
    """
    d = C.shape[0]
    trace = float(torch.trace(C))
    if trace <= 0:
        return C.new_zeros(d, 0), C.new_zeros(0), 0.0, 0.0

    def exact():
        with _one_thread():
            ev, vec = torch.linalg.eigh(C)
        ev, vec = ev.flip(0), vec.flip(1)
        lam_max = float(ev[0])
        m = _range_size(ev, trace, energy, lam_max, massive)[0]
        return vec[:, :m].contiguous(), ev[:m].clone(), trace, lam_max

    if d <= EXACT_EIGH_MAX:
        return exact()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    block = min(d, max(256, int(1.2 * hint) + 64 if hint else 256))
    Cf = C.float()  # float32 is ample for a subspace (2x faster products and QR); the energy sums stay exact
    Q = None
    while True:
        if 2 * block > 1.2 * d:  # the range is not small: exact decomposition is cheaper
            return exact()
        omega = torch.randn(d, block, generator=gen).to(C.device)
        if Q is not None:
            omega[:, : Q.shape[1]] = Q
        Y = Cf @ omega
        for _ in range(2):
            with _one_thread():
                Q = torch.linalg.qr(Y)[0]
            Y = Cf @ Q
        with _one_thread():
            Q = torch.linalg.qr(Y)[0]
            ev, W = torch.linalg.eigh((Q.T @ Cf @ Q).double())
        ev, W = ev.flip(0), W.flip(1).to(Q.dtype)
        lam_max = float(ev[0])
        m, n_pos, need = _range_size(ev, trace, energy, lam_max, massive)
        reached = float(ev[:m].sum()) >= need or (m == n_pos and n_pos < block)
        if reached and m <= block - max(16, block // 8):
            R = (Q @ W[:, :m]).double()
            kept = torch.diagonal(R.T @ (C @ R)) if m else ev[:0]  # exact energies of the kept directions
            return R.contiguous(), kept.clone(), trace, lam_max
        block = min(d, 2 * block)


@torch.no_grad()
def _smallest_components(M: torch.Tensor, R: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The last R singular triplets of M (float64): U (m×R), S (R, descending), Vh (R×n), all σ² (ascending).

    Through the Gram matrix of the smaller side (eigh of ≤ min(m, n)²): for the smallest components this is as
    accurate as a full SVD while σ_R ≥ 1e-5 σ_max, and several times faster; below that a full SVD is used.
    """
    m, n = M.shape
    R = min(R, m, n)
    G = M @ M.T if m <= n else M.T @ M
    with _one_thread():
        ev, E = torch.linalg.eigh(G)
    ev = ev.clamp(min=0)
    s = ev.sqrt()
    S = s[:R]
    if bool((S <= 1e-5 * s[-1]).any()):
        with _one_thread():
            U_, S_, Vh_ = torch.linalg.svd(M, full_matrices=False)
        return U_[:, -R:].contiguous(), S_[-R:].contiguous(), Vh_[-R:].contiguous(), (S_ ** 2).flip(0)
    if m <= n:
        U = E[:, :R]
        Vh = (U.T @ M) / S[:, None]
    else:
        V = E[:, :R]
        U = (M @ V) / S[None, :]
        Vh = V.T
    # PEFT's CorDA order: descending σ, the kept kpm components are the last ones
    return U.flip(1).contiguous(), S.flip(0).contiguous(), Vh.flip(0).contiguous(), ev


def _as_prompts(harmful) -> list[str]:
    if hasattr(harmful, "train"):
        return list(harmful.train)
    return list(harmful)


@torch.no_grad()
def compute_guardspace(model: nn.Module, tokenizer, prompts: list[str], config: GuardSpaceConfig | None = None,
                       batch_size: int = 16, progress: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The ``guardspace`` artifact component (tensors, meta) for ``model`` on harmful ``prompts``."""
    from tqdm.auto import tqdm

    from ..modeling import StopForward, find_decoder_layers, pad_right, run_until, tokenize_prompts

    cfg = config or GuardSpaceConfig()
    t0 = time.perf_counter()
    prompts = prompts[: cfg.max_prompts] if cfg.max_prompts else list(prompts)
    if not prompts:
        raise GuardSpaceError("guardspace calibration: no harmful prompts")
    targets = _target_linears(model, cfg.target_modules)
    seqs = tokenize_prompts(tokenizer, prompts)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # less padding
    seqs = [seqs[i] for i in order]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    blocks = find_decoder_layers(model)
    n_layers = len(blocks)

    # memory plan: float64 covariances (one per distinct input dim and layer, an upper bound for shared inputs);
    # layers are split into passes that each fit max_covariance_gb (each pass re-runs the prefix of the model)
    per_layer: dict[int, int] = {}
    for i in sorted({i for i, _n, _m in targets}):
        dims = {mod.in_features for j, _n, mod in targets if j == i}
        per_layer[i] = sum(d * d * 8 for d in dims)
    budget = cfg.max_covariance_gb * 2 ** 30
    passes: list[list[int]] = [[]]
    used = 0
    for i, size in per_layer.items():
        if passes[-1] and used + size > budget:
            passes.append([])
            used = 0
        passes[-1].append(i)
        used += size

    # Causal model: the tokens every prompt starts with (chat-template prefix, system prompt) have identical
    # activations in every prompt; they are counted once with weight N (exact, and ~half the products for Qwen).
    prefix = 0
    while _DEDUP_PREFIX and all(len(q) > prefix for q in seqs) and len({q[prefix] for q in seqs}) == 1:
        prefix += 1
    prefix = min(prefix, min(len(q) for q in seqs) - 1)

    def weights(start: int, mask: torch.Tensor) -> torch.Tensor:
        w = mask.to(torch.float64)
        w[:, :prefix] = 0.0
        if start == 0:
            w[0, :prefix] = float(len(seqs))
        return w

    hints: dict[int, int] = {}
    tensors: dict[str, torch.Tensor] = {}
    layers_meta: dict[str, dict[str, Any]] = {}
    groups_meta: dict[str, dict[str, Any]] = {}
    n_group = 0
    was_training = model.training
    model.eval()
    try:
        for pi, chunk in enumerate(passes):
            mods = {f"{i}.{name}": mod for i, name, mod in targets if i in chunk}
            cov = _Covariances(mods)
            stop = None
            last = max(chunk)
            if last < n_layers - 1:
                def _stop(_m, _i, _o):
                    raise StopForward

                stop = blocks[last].register_forward_hook(_stop)
            try:
                rng = range(0, len(seqs), batch_size)
                desc = f"guardspace: covariance pass {pi + 1}/{len(passes)}"
                for s in tqdm(rng, desc=desc, unit="batch", disable=not progress):
                    ids, mask = pad_right(seqs[s: s + batch_size], pad)
                    cov.new_batch(weights(s, mask))
                    run_until(model, input_ids=ids.to(device), attention_mask=mask.to(device))
                    cov.end_batch()
            finally:
                cov.remove()
                if stop is not None:
                    stop.remove()
            # ---- per input group: null space, damped covariance, then its modules (one group in memory at a time)
            for key in mods:
                if key not in cov.group_of:
                    raise GuardSpaceError(f"guardspace calibration: target '{key}' was never called on the prompts")
            for g in range(len(cov.acc)):
                C = cov.acc[g].div_(max(1.0, cov.count[g]))
                cov.acc[g] = None
                gid = n_group
                n_group += 1
                d = C.shape[0]
                R, ev, trace, lam_max = _range_basis(C, cfg.null_energy, seed=gid, hint=hints.get(d),
                                                     massive=cfg.massive_share)
                hints[d] = int(R.shape[1])
                members = sorted(k for k, v in cov.group_of.items() if v == g)
                kept = float(ev.sum()) / trace if trace > 0 else 0.0
                gm = {
                    "members": members, "dim": d, "tokens": int(round(cov.count[g])), "range_dim": int(R.shape[1]),
                    "null_dim": d - int(R.shape[1]), "null_energy": max(0.0, 1.0 - kept), "trace": trace,
                    "lambda_max": lam_max, "top1_energy": lam_max / trace if trace > 0 else 0.0,
                }
                groups_meta[str(gid)] = gm
                tensors[f"group{gid}.range"] = R.float()
                tensors[f"group{gid}.eigvals"] = ev.double()
                del R
                # C_d = C + damping·mean(diag C)·I (PEFT's CorDA rule; doubled until Cholesky succeeds)
                mean_diag = max(float(torch.diagonal(C).mean()), 1e-12)
                damp = cfg.damping
                C.diagonal().add_(damp * mean_diag)
                while True:
                    with _one_thread():
                        L, info = torch.linalg.cholesky_ex(C)
                    if int(info) == 0:
                        break
                    C.diagonal().add_(damp * mean_diag)
                    damp *= 2
                for key in members:
                    W = mods[key].weight.detach()
                    if W.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
                        raise GuardSpaceError(f"guardspace calibration: '{key}' has {W.dtype} weights; calibrate the "
                                              "unquantized model (QLoRA can then train on the quantized one)")
                    # W·C_d: float32 product for wide layers (kept σ ≥ 1e-5 σ_max, else a full SVD is used)
                    M = (W.float() @ C.float()).double() if W.shape[1] > EXACT_EIGH_MAX else W.double() @ C
                    U, S, Vh, sig2 = _smallest_components(M, cfg.calibration_rank)
                    del M
                    with _one_thread():
                        V = torch.cholesky_solve(Vh.T.contiguous(), L)  # Ṽ = C_d⁻¹ V  (PEFT's V_WC)
                    total = float(sig2.sum())
                    r_default = min(cfg.rank or 16, S.numel())
                    layer_idx, _, name = key.partition(".")
                    layers_meta[key] = {
                        "layer": int(layer_idx), "module": name, "d_in": int(W.shape[1]), "d_out": int(W.shape[0]),
                        "group": gid, "stored_rank": int(S.numel()), "damping": damp,
                        "null_dim": gm["null_dim"], "null_fraction": gm["null_dim"] / gm["dim"],
                        "null_energy": gm["null_energy"],
                        # share of ‖W·C_d‖² in the adapter (safety-irrelevant, smallest-σ) part for r = rank (16)
                        "adapter_energy": float(sig2[:r_default].sum()) / total if total > 0 else 0.0,
                    }
                    tensors[f"{key}.U"] = U.float()
                    tensors[f"{key}.S"] = S.float()
                    tensors[f"{key}.V"] = V.float()
                del C, L
            del cov
    finally:
        model.train(was_training)
    nulls = [m["null_dim"] for m in layers_meta.values()]
    by_mod: dict[str, list[int]] = {}
    for m in layers_meta.values():
        by_mod.setdefault(m["module"], []).append(m["null_dim"])
    summary = "; ".join(f"{name} {min(v)}-{max(v)}/{next(x['d_in'] for x in layers_meta.values() if x['module'] == name)}"
                        for name, v in sorted(by_mod.items()))
    meta = {
        "method": "GuardSpace (arXiv 2510.14301): CorDA-kpm on harmful-prompt covariance + null-space projector",
        "num_layers": n_layers,
        "targets": sorted({m["module"] for m in layers_meta.values()}),
        "n_modules": len(layers_meta),
        "n_prompts": len(prompts),
        "n_tokens": max(g["tokens"] for g in groups_meta.values()),
        "shared_prefix_tokens": prefix,
        "calibration_rank": cfg.calibration_rank,
        "null_energy_threshold": cfg.null_energy,
        "massive_share": cfg.massive_share,
        "damping": cfg.damping,
        "min_null_dim_found": min(nulls),
        "null_dims_summary": f"null-space dims per module (min-max over layers / input dim): {summary}",
        "seconds": round(time.perf_counter() - t0, 1),
        "layers": layers_meta,
        "groups": groups_meta,
    }
    return tensors, meta


def calibrate_guardspace(model: nn.Module, tokenizer, harmful, artifact=None, config: GuardSpaceConfig | dict | None = None,
                         out_dir: str | os.PathLike | None = None, model_id: str = "model", batch_size: int = 16,
                         progress: bool = True, check: bool = True):
    """Add (or replace) the ``guardspace`` component. ``harmful``: a PromptSet (train split) or a list of prompts.

    ``check`` runs the null-space sanity checks for ``config`` (raises :class:`GuardSpaceError` naming the layer).
    Writes the artifact to ``out_dir`` when given. Returns the :class:`~safeguard_plugin.artifacts.Artifact`.
    """
    from ..artifacts import Artifact

    cfg = _config(config)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if artifact is None:
        artifact = Artifact.new(model, tokenizer, model_id)
    tensors, meta = compute_guardspace(model, tokenizer, _as_prompts(harmful), cfg, batch_size, progress)
    artifact.tensors.pop(COMPONENT, None)
    artifact.manifest["components"].pop(COMPONENT, None)
    artifact.add_component(COMPONENT, tensors, meta)
    if check:
        GuardSpace(cfg, artifact)  # the plan raises on an empty / near-identity null space
    if out_dir is not None:
        artifact.save(out_dir)
    return artifact


def _config(config) -> GuardSpaceConfig:
    if config is None:
        return GuardSpaceConfig()
    if isinstance(config, GuardSpaceConfig):
        return config
    return GuardSpaceConfig.model_validate(dict(config))


# ================================================================================================ runtime layers
class NullSpaceLoraA(nn.Linear):
    """PEFT ``lora_A`` that sees only the null-space part of its input: ``A (P x)``, computed as ``(A P) x``.

    The raw weight keeps PEFT's name (``lora_A.<adapter>.weight``), so PEFT's state-dict code handles it as usual;
    the basis and the frozen init factors are non-persistent buffers (saved by :func:`save_guardspace`).
    """

    def __init__(self, src: nn.Linear, basis: torch.Tensor | None, init_A: torch.Tensor, init_B: torch.Tensor,
                 dense: torch.Tensor | None = None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = src.in_features, src.out_features
        self.weight = src.weight
        self.register_parameter("bias", None)
        self.register_buffer("gs_basis", basis, persistent=False)  # R (d×m): P = I − R Rᵀ; None: no projector
        # small inputs: P itself (d×d, shared by the layers reading the same input), one product per forward
        self.register_buffer("gs_dense", dense, persistent=False)
        self.register_buffer("gs_init_A", init_A, persistent=False)  # A₀P (r×d)
        self.register_buffer("gs_init_B", init_B, persistent=False)  # B₀ (d_out×r)
        self.called = False
        # True: project in every forward. False: the GuardSpace constraint keeps A = A P after each optimizer step
        # (``project_``), so the forward is a plain LoRA product.
        self.project_in_forward = True
        self._clean_version: int | None = None  # weight._version right after the last projection

    def projected_weight(self) -> torch.Tensor:
        w = self.weight
        if self.gs_dense is not None:
            return w @ self.gs_dense
        if self.gs_basis is None:
            return w
        R = self.gs_basis
        return torch.addmm(w, w @ R, R.T, alpha=-1.0)  # A − (A R) Rᵀ = A P

    @torch.no_grad()
    def project_(self) -> None:
        """A ← A P in place (also the fp32 master copy under DeepSpeed)."""
        from ..distributed import get_full_param, set_full_param

        if self.gs_basis is None:
            return
        A = get_full_param(self.weight)
        if self.gs_dense is not None:
            new = A @ self.gs_dense.to(A.dtype)
        else:
            R = self.gs_basis.to(A.dtype)
            new = torch.addmm(A, A @ R, R.T, alpha=-1.0)
        set_full_param(self.weight, new)
        self._clean_version = self.weight._version

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not self.called:
            self.called = True
        if self.project_in_forward:
            return F.linear(x, self.projected_weight())
        if self.weight._version != self._clean_version and not hasattr(self.weight, "ds_id"):
            # written since the last projection without an after_step (a training loop without the callback, a
            # load_state_dict): training projects it now, in place; eval projects this product only (no weight
            # changes in an eval forward). The callback's after_step projects unconditionally (also updates that
            # bypass the version counter).
            if not self.training:
                return F.linear(x, self.projected_weight())
            self.project_()
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        m = 0 if self.gs_basis is None else self.gs_basis.shape[1]
        return f"in_features={self.in_features}, out_features={self.out_features}, null_dim={self.in_features - m}"


class GuardSpaceLayerMixin:
    """Mixed into PEFT's LoRA layer class (instance class swap): correct merge, reference and offset behaviour."""

    gs_adapter: str
    gs_mode: str  # "weights" | "offset"

    def _gs_lora_A(self) -> NullSpaceLoraA:
        return self.lora_A[self.gs_adapter]

    def _gs_included(self) -> bool:
        """Whether PEFT's forward includes this adapter's contribution."""
        if self.disable_adapters:
            return False
        return self.merged or self.gs_adapter in self.active_adapters

    def _gs_init_term(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        a = self._gs_lora_A()
        A0, B0 = a.gs_init_A, a.gs_init_B
        y = F.linear(F.linear(x.to(A0.dtype), A0), B0) * self.scaling[self.gs_adapter]
        return y.to(like.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.get("adapter_names") is not None:
            raise NotImplementedError("GuardSpace layers do not support mixed-adapter batches (adapter_names)")
        result = super().forward(x, *args, **kwargs)
        included = self._gs_included()
        if self.gs_mode == "weights" and not included:
            result = result + self._gs_init_term(x, result)  # W_res x + s B₀A₀P x = W x
        elif self.gs_mode == "offset" and included and not self.merged:
            result = result - self._gs_init_term(x, result)
        return result

    def get_delta_weight(self, adapter) -> torch.Tensor:
        if adapter != self.gs_adapter:
            return super().get_delta_weight(adapter)
        from peft.utils.other import transpose

        a = self._gs_lora_A()
        dtype = self.lora_B[adapter].weight.dtype
        B = self.lora_B[adapter].weight.float()
        delta = B @ a.projected_weight().float()
        if self.gs_mode == "offset":
            delta = delta - a.gs_init_B.float() @ a.gs_init_A.float()
        return (transpose(delta, self.fan_in_fan_out) * self.scaling[adapter]).to(dtype)


_CLASSES: dict[type, type] = {}


def _guardspace_class(cls: type) -> type:
    if issubclass(cls, GuardSpaceLayerMixin):
        return cls
    if cls not in _CLASSES:
        name = f"GuardSpace{cls.__name__}"
        new = type(name, (GuardSpaceLayerMixin, cls), {"__module__": __name__, "__qualname__": name})
        globals()[name] = new  # picklable by name
        _CLASSES[cls] = new
    return _CLASSES[cls]


def guardspace_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{"<layer>.<in-block name>": GuardSpace LoRA layer}``."""
    from ..modeling import find_decoder_layers

    out = {}
    for i, block in enumerate(find_decoder_layers(model)):
        for name, mod in block.named_modules():
            if isinstance(mod, GuardSpaceLayerMixin):
                out[f"{i}.{name}"] = mod
    return out


def _blocks_prefix(model: nn.Module) -> str:
    from ..modeling import find_decoder_layers

    blocks = find_decoder_layers(model)
    for name, mod in model.named_modules():
        if mod is blocks:
            return name
    raise GuardSpaceError("guardspace: decoder blocks not found in the model")


def _base_dtype_is_float(layer: nn.Module) -> bool:
    w = getattr(layer, "weight", None)
    return isinstance(w, torch.Tensor) and w.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64) \
        and type(w) in (torch.Tensor, nn.Parameter)


DENSE_PROJECTOR_MAX = 512  # inputs up to this dim keep P (d×d) instead of R: fewer ops per step (tiny models)


def _dense_projector(basis: torch.Tensor | None, cache: dict[int, torch.Tensor], key: int) -> torch.Tensor | None:
    """P = I − R Rᵀ for small inputs (one per shared basis: ``key`` = id of the stored basis), else None."""
    if basis is None or basis.shape[0] > DENSE_PROJECTOR_MAX:
        return None
    if key not in cache:
        eye = torch.eye(basis.shape[0], dtype=basis.dtype, device=basis.device)
        cache[key] = torch.addmm(eye, basis, basis.T, alpha=-1.0)
    return cache[key]


def _install(layer: nn.Module, adapter: str, mode: str, basis: torch.Tensor | None,
             dense_cache: dict[int, torch.Tensor] | None = None) -> None:
    """Swap the LoRA layer's class and replace ``lora_A[adapter]`` with the projected version (init = current A, B)."""
    src = layer.lora_A[adapter]
    dev, dt = src.weight.device, src.weight.dtype
    init_A = src.weight.detach().clone()
    init_B = layer.lora_B[adapter].weight.detach().clone()
    key = id(basis)
    if basis is not None and (basis.device != dev or basis.dtype != dt):
        basis = basis.to(device=dev, dtype=dt)
    dense = _dense_projector(basis, dense_cache if dense_cache is not None else {}, key)
    layer.lora_A[adapter] = NullSpaceLoraA(src, basis, init_A, init_B, dense)
    layer.__class__ = _guardspace_class(type(layer))
    layer.gs_adapter = adapter
    layer.gs_mode = mode


# ================================================================================================ constraint
class GuardSpace(Constraint):
    """Safety-preserving LoRA: CorDA-kpm init from harmful-prompt covariances + null-space projector (no penalty)."""

    name = "guardspace"
    config_class = GuardSpaceConfig
    metrics_read_params = True  # the update norm reads lora_A / lora_B (gathered under ZeRO-3 by the engine)
    nonzero_adapter_init = True  # adapters start from the safety-irrelevant SVD components
    calibrates_base_layers = True  # covariances and SVDs of the plain Linear layers
    calibration_note = ("input covariances and one SVD per Linear layer; 4.6 min for "
                        "128 prompts on Qwen2.5-0.5B, 2 CPU cores")
    owns_model_save = True  # a plain save drops the projector and the residual: the trainer's saves use save_model
    requires = (COMPONENT,)

    def __init__(self, config: GuardSpaceConfig, artifact):
        super().__init__(config, artifact)
        self.tensors, self.meta = artifact.component(COMPONENT)
        self.bases: dict[int, torch.Tensor | None] = {}
        self.null_dims: dict[str, int] = {}
        self._plan()
        self.gs_layers: dict[str, nn.Module] = {}
        self._checked_calls = False
        self._model: nn.Module | None = None
        self._dense_cache: dict[int, torch.Tensor] = {}

    # -- null space per input group for this config
    def _plan(self) -> None:
        cfg, meta = self.config, self.meta
        calibrated = float(meta.get("null_energy_threshold", 0.0))
        for gid, g in meta["groups"].items():
            d = int(g["dim"])
            ev = self.tensors[f"group{gid}.eigvals"].double()
            R = self.tensors[f"group{gid}.range"]
            trace, lam_max = float(g["trace"]), float(g["lambda_max"])
            m, _, need = _range_size(ev, trace, cfg.null_energy, lam_max, cfg.massive_share)
            lower = cfg.null_energy < calibrated - 1e-12
            stricter = lower or cfg.massive_share != meta.get("massive_share")
            if stricter and float(ev.sum()) < need - 1e-9 * trace:  # the stored range basis is too small
                why = (f"guardspace.null_energy={cfg.null_energy} is below the artifact's calibrated threshold "
                       f"{calibrated}" if lower else
                       f"guardspace.massive_share={cfg.massive_share} blocks more directions than the artifact's "
                       f"calibration (massive_share={meta.get('massive_share')}) stored for {g['members'][0]}")
                raise GuardSpaceError(f"{why}: re-run the GuardSpace calibration with null_energy <= "
                                      f"{cfg.null_energy} and massive_share={cfg.massive_share}")
            self.bases[int(gid)] = R[:, :m].contiguous() if cfg.use_projector else None
            for key in g["members"]:
                self.null_dims[key] = d - m
        # config-level checks on the layers this config targets (the adapter rank is checked again at surgery)
        for key in sorted(self.meta["layers"], key=_key_order):
            if self._targeted(key):
                self._check_layer(key, cfg.rank)

    def _targeted(self, key: str) -> bool:
        t = self.config.target_modules
        mod = self.meta["layers"][key]["module"]
        return t == "all-linear" or any(mod == x or mod.endswith("." + x) for x in t)

    def _check_layer(self, key: str, r: int | None) -> None:
        """Fail loudly, naming the layer, when its projector is empty, too small for the rank, or near identity."""
        cfg = self.config
        if not cfg.use_projector:
            return
        k = self.null_dims[key]
        d = int(self.meta["layers"][key]["d_in"])
        where = f"guardspace: layer {key} (input dim {d})"
        if k == 0:
            raise GuardSpaceError(
                f"{where}: the harmful-prompt covariance is (numerically) full rank and no direction lies under "
                f"null_energy={cfg.null_energy}, so the null space is empty and the adapter could learn nothing. "
                "Raise guardspace.null_energy (e.g. 0.01), or set use_projector: false.")
        min_dim = cfg.min_null_dim or r
        if min_dim is not None and k < min_dim:
            raise GuardSpaceError(
                f"{where}: the null space has {k} dims, below min_null_dim={min_dim} (the adapter's rank {r} could "
                "not be used). Raise guardspace.null_energy, or lower min_null_dim / the rank.")
        if k / d > cfg.max_null_fraction:
            lm = self.meta["layers"][key]
            g = self.meta["groups"][str(lm["group"])]
            top = float(g["lambda_max"]) / float(g["trace"]) if float(g["trace"]) > 0 else 0.0
            n_tok = int(self.meta.get("n_tokens", 0))
            why = (f"one input direction holds {top:.2%} of the harmful-input energy (a massive activation), so the "
                   f"bottom {cfg.null_energy:g} of the energy spans almost every other direction: set "
                   "guardspace.massive_share: 0.9 (massive directions are blocked and null_energy applies to the "
                   "rest; re-calibrate with it), lower guardspace.null_energy (and re-calibrate with it), or leave "
                   "this module out of target_modules"
                   if top > 1 - 10 * cfg.null_energy else
                   f"the covariance is rank-deficient ({n_tok} calibration tokens): use more harmful calibration "
                   "prompts or a lower null_energy")
            raise GuardSpaceError(
                f"{where}: the null space covers {k}/{d} dims (> max_null_fraction={cfg.max_null_fraction}): the "
                f"projector is near identity and would not protect anything; {why}.")

    # -- reports
    def null_space_report(self) -> dict[str, dict[str, float]]:
        """Per layer: null-space dim, its share of input dims and of harmful-input energy (for this config)."""
        out = {}
        for key, lm in sorted(self.meta["layers"].items(), key=lambda kv: _key_order(kv[0])):
            gid = lm["group"]
            g = self.meta["groups"][str(gid)]
            B = self.bases.get(int(gid))
            ev = self.tensors[f"group{gid}.eigvals"].double()
            m = 0 if B is None else B.shape[1]
            kept = float(ev[:m].sum()) / g["trace"] if g["trace"] > 0 else 0.0
            out[key] = {"null_dim": lm["d_in"] - m if B is not None else 0, "d_in": lm["d_in"],
                        "null_energy": (1.0 - kept) if B is not None else 0.0}
        return out

    # -- model
    def _module_map(self, model: nn.Module) -> dict[str, nn.Module]:
        from ..modeling import find_decoder_layers

        out = {}
        for i, block in enumerate(find_decoder_layers(model)):
            for name, mod in block.named_modules():
                key = f"{i}.{name}"
                if key in self.meta["layers"] or _is_lora_layer(mod):
                    out[key] = mod
        return out

    def validate_model(self, model: nn.Module) -> None:
        from ..modeling import find_decoder_layers

        n = len(find_decoder_layers(model))
        if n != int(self.meta["num_layers"]):
            raise GuardSpaceError(f"guardspace: artifact has {self.meta['num_layers']} layers, the model {n}")
        mods = self._module_map(model)
        for key, lm in self.meta["layers"].items():
            mod = mods.get(key)
            if mod is None:
                continue  # not adapted here (e.g. the trainer's LoRA targets fewer modules)
            base = mod.get_base_layer() if _is_lora_layer(mod) else mod
            shape = (getattr(base, "out_features", None), getattr(base, "in_features", None))
            if shape != (lm["d_out"], lm["d_in"]):
                raise GuardSpaceError(f"guardspace: layer {key} is {shape[0]}×{shape[1]} in the model, "
                                      f"{lm['d_out']}×{lm['d_in']} in the artifact")

    def modify_model(self, model: nn.Module) -> None:
        existing = guardspace_layers(model)
        if existing:  # idempotent (engine re-bound to the same model, or prepare_guardspace_model / load_guardspace)
            self.gs_layers, self._model = existing, model
            self._set_projection()
            return
        mods = self._module_map(model)
        lora = {k: m for k, m in mods.items() if _is_lora_layer(m)}
        if lora:
            self._convert_existing(lora)
        else:
            self._inject(model, mods)
        self.gs_layers = guardspace_layers(model)
        self._model = model
        self._set_projection()
        rep = self.null_space_report()
        lines = [f"  {k}: r={self.gs_layers[k].r[self.gs_layers[k].gs_adapter]} null_dim={rep[k]['null_dim']}/{rep[k]['d_in']}"
                 f" harmful energy in null space {rep[k]['null_energy']:.2%}" for k in self.gs_layers]
        logger.info("guardspace: %d adapted layers (projector %s)\n%s", len(self.gs_layers),
                    "on" if self.config.use_projector else "OFF", "\n".join(lines))

    def _factors(self, key: str, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lm = self.meta["layers"][key]
        if r > lm["stored_rank"]:
            raise GuardSpaceError(f"guardspace: rank {r} > the artifact's stored rank {lm['stored_rank']} for {key}; "
                                  "re-calibrate with a larger calibration_rank")
        U = self.tensors[f"{key}.U"][:, -r:].clone()
        S = self.tensors[f"{key}.S"][-r:].clone()
        V = self.tensors[f"{key}.V"][:, -r:].clone()
        basis = self.bases[int(lm["group"])]
        if basis is not None:
            V = V - basis @ (basis.T @ V)  # P Ṽ_r: A₀ = Σ^½ (P Ṽ)ᵀ lies in the null space
        return U, S, V

    def _mode(self, base: nn.Module) -> str:
        if self.config.residual != "auto":
            if self.config.residual == "weights" and not _base_dtype_is_float(base):
                raise GuardSpaceError("guardspace.residual=weights needs float base weights; use 'offset' for QLoRA")
            return self.config.residual
        return "weights" if _base_dtype_is_float(base) else "offset"

    def _init_layer(self, layer: nn.Module, key: str, adapter: str) -> None:
        if adapter in getattr(layer, "lora_variant", {}):
            raise GuardSpaceError(f"guardspace: {key} uses a LoRA variant (DoRA, ...); only plain LoRA is supported")
        if layer.lora_bias.get(adapter):
            raise GuardSpaceError("guardspace: lora_bias is not supported")
        base = layer.get_base_layer()
        r = layer.r[adapter]
        self._check_layer(key, r)
        U, S, V = self._factors(key, r)
        mode = self._mode(base)
        dev = layer.lora_A[adapter].weight.device
        if mode == "weights":
            base.eigens = CordaEigens(S_WC=S.to(dev), U_WC=U.to(dev), V_WC=V.to(dev))
            try:
                layer.corda_init(adapter, "corda")  # PEFT: A, B from the factors; W_res = W − s·B·A in the base
            finally:
                if hasattr(base, "eigens"):  # corda_init removes it itself
                    del base.eigens
        else:
            S = S / layer.scaling[adapter]
            with torch.no_grad():
                layer.lora_A[adapter].weight.copy_(V.t().mul(S.sqrt().view(-1, 1)))
                layer.lora_B[adapter].weight.copy_(U.mul(S.sqrt()))
        basis = self.bases[int(self.meta["layers"][key]["group"])]
        _install(layer, adapter, mode, basis, self._dense_cache)

    def _convert_existing(self, lora: dict[str, nn.Module]) -> None:
        missing = [k for k in lora if k not in self.meta["layers"]]
        if missing:
            raise GuardSpaceError(f"guardspace: the model's LoRA adapters target {missing}, which the artifact did not "
                                  "calibrate (a plain adapter there would bypass the null space); calibrate those "
                                  "modules or drop them from peft_config.target_modules")
        for key, layer in lora.items():
            adapters = [a for a in layer.active_adapters if a in layer.lora_A]
            if len(adapters) != 1:
                raise GuardSpaceError(f"guardspace: {key} has active adapters {adapters}; exactly one is supported")
            adapter = adapters[0]
            r = layer.r[adapter]
            if self.config.rank is not None and self.config.rank != r:
                raise GuardSpaceError(f"guardspace.rank={self.config.rank} but the trainer's LoRA adapter has r={r}; "
                                      "drop guardspace.rank or match peft_config.r")
            if self.config.lora_alpha is not None and not math.isclose(self.config.lora_alpha, layer.lora_alpha[adapter]):
                raise GuardSpaceError("guardspace.lora_alpha differs from the trainer's LoRA alpha")
            self._init_layer(layer, key, adapter)
        for layer in lora.values():
            layer.get_base_layer().requires_grad_(False)

    def _inject(self, model: nn.Module, mods: dict[str, nn.Module]) -> None:
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.lora.config import CordaConfig

        cfg = self.config
        wanted = {k: m for k, m in mods.items() if k in self.meta["layers"]}
        if cfg.target_modules != "all-linear":
            sel = {k: m for k, m in wanted.items() if any(self.meta["layers"][k]["module"] == t or
                                                            self.meta["layers"][k]["module"].endswith("." + t)
                                                            for t in cfg.target_modules)}
            found = {self.meta["layers"][k]["module"].split(".")[-1] for k in sel}
            lost = [t for t in cfg.target_modules if t.split(".")[-1] not in found]
            if lost:
                raise GuardSpaceError(f"guardspace.target_modules {lost} were not calibrated in the artifact "
                                      f"(it has {self.meta['targets']})")
            wanted = sel
        if not wanted:
            raise GuardSpaceError("guardspace: no calibrated module found in the model")
        r = cfg.rank or 16
        alpha = cfg.lora_alpha or 2 * r
        prefix = _blocks_prefix(model)
        full = {f"{prefix}.{k}": k for k in wanted}
        modes = {self._mode(m) for m in wanted.values()}
        if len(modes) != 1:
            raise GuardSpaceError("guardspace: mixed float/quantized target layers are not supported")
        mode = modes.pop()
        scaling = alpha / r
        for k in wanted:
            self._check_layer(k, r)
        if mode == "weights":
            for k, m in wanted.items():
                U, S, V = self._factors(k, r)
                m.eigens = CordaEigens(S_WC=S.to(m.weight.device), U_WC=U.to(m.weight.device),
                                       V_WC=V.to(m.weight.device))
        lcfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=cfg.lora_dropout, target_modules=sorted(full),
                          init_lora_weights="corda" if mode == "weights" else True,
                          corda_config=CordaConfig(corda_method="kpm") if mode == "weights" else None, bias="none")
        try:
            inject_adapter_in_model(lcfg, model, adapter_name="default")
        finally:
            for m in wanted.values():
                if hasattr(m, "eigens"):
                    del m.eigens
        mods2 = self._module_map(model)
        for k in wanted:
            layer = mods2[k]
            if mode == "offset":
                self._init_layer(layer, k, "default")
            else:
                _install(layer, "default", mode, self.bases[int(self.meta["layers"][k]["group"])], self._dense_cache)
            if not math.isclose(layer.scaling["default"], scaling):
                raise GuardSpaceError(f"guardspace: LoRA scaling of {k} changed during surgery ({layer.scaling['default']} "
                                      f"vs {scaling}); use one lora_alpha / r for every targeted module")
        for n, p in model.named_parameters():
            if "lora_" not in n:
                p.requires_grad_(False)

    def _set_projection(self) -> None:
        """'step': project A once now (a no-op for a fresh init, which lies in the null space), then after each step."""
        step = self.config.projection == "step"
        for layer in self.gs_layers.values():
            a = layer.lora_A[layer.gs_adapter]
            if step and a.project_in_forward:
                a.project_()
            a.project_in_forward = not step

    # -- training
    def after_step(self, ctx: TrainContext) -> None:
        for layer in self.gs_layers.values():
            a = layer.lora_A[layer.gs_adapter]
            if not a.project_in_forward:
                a.project_()
        if self._checked_calls or not self.gs_layers:
            return
        self._checked_calls = True
        if not any(layer.lora_A[layer.gs_adapter].called for layer in self.gs_layers.values()):
            raise SafeguardRuntimeError(
                "guardspace: the projected lora_A modules were never called in the first training step: something "
                "bypasses the LoRA module forward (fused LoRA kernels such as Axolotl's lora_qkv_kernel / "
                "lora_o_kernel / lora_mlp_kernel), so the null-space projector would not apply. Disable them.")

    @torch.no_grad()
    def metrics(self) -> dict[str, float]:
        if not self.gs_layers:
            return {}
        tot = 0.0
        for layer in self.gs_layers.values():
            a = layer.lora_A[layer.gs_adapter]
            B = torch.cat([layer.lora_B[layer.gs_adapter].weight.float(), -a.gs_init_B.float()], 1)
            A = torch.cat([a.projected_weight().float(), a.gs_init_A.float()], 0)
            # ‖B A‖_F² = Σ (BᵀB) ∘ (A Aᵀ), cheap (2r × 2r)
            tot += float(((B.T @ B) * (A @ A.T)).sum().clamp(min=0)) * layer.scaling[layer.gs_adapter] ** 2
        return {"guardspace_update_norm": math.sqrt(tot)}

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """:func:`save_guardspace` for the model this constraint modified (GuardSpace files + exported LoRA)."""
        if self._model is None:
            raise GuardSpaceError("guardspace: modify_model has not run")
        return save_guardspace(self._model, folder)

    # -- the trainer's own saves (Constraint.owns_model_save)
    def save_model(self, model: nn.Module, folder: str | os.PathLike) -> str:
        """The trainer's model save: :func:`save_guardspace` (a standard PEFT adapter with the projector folded in,
        which ``PeftModel.from_pretrained(base, folder)`` loads, plus the GuardSpace files for resuming)."""
        save_guardspace(model, folder)
        return (f"projector included; reload with PeftModel.from_pretrained(base_model, {str(folder)!r}) or "
                f"load_guardspace(base_model, {str(folder)!r}) (trainable)")

    def load_model(self, model: nn.Module, folder: str | os.PathLike) -> bool:
        """Resume: the trained factors :meth:`save_model` wrote, into the adapters set up from the same artifact."""
        return restore_guardspace_factors(model, folder)

    # -- benchmark / calibration
    @classmethod
    def benchmark_configs(cls) -> dict[str, dict]:
        return {"guardspace": {"null_energy": 0.01}}

    @classmethod
    def calibrate(cls, ctx, artifact, config: GuardSpaceConfig | dict | None = None) -> None:
        if artifact.has(COMPONENT):
            return
        cfg = config if config is not None else (getattr(ctx, "constraint_configs", None) or {}).get(cls.name)
        if cfg is None:
            cfg = (getattr(ctx, "cache", None) or {}).get("guardspace_config")
        cfg = _config(cfg)
        tensors, meta = compute_guardspace(ctx.model, ctx.tokenizer, _as_prompts(ctx.harmful), cfg,
                                           batch_size=ctx.batch_size, progress=ctx.progress)
        artifact.add_component(COMPONENT, tensors, meta)
        logger.info("guardspace: calibrated %d modules on %d prompts in %.0fs; smallest null space %d dims",
                    meta["n_modules"], meta["n_prompts"], meta["seconds"], meta["min_null_dim_found"])


def _key_order(key: str) -> tuple[int, str]:
    i, _, name = key.partition(".")
    return int(i), name


# ================================================================================================ public helpers
def _load_artifact(artifact_or_path):
    from ..artifacts import Artifact

    if isinstance(artifact_or_path, Artifact):
        return artifact_or_path
    return Artifact.load(artifact_or_path)


def prepare_guardspace_model(model: nn.Module, artifact_or_path, strict_fingerprint: bool = True, **cfg) -> nn.Module:
    """In-place GuardSpace surgery for scripts: returns the same model object (adapters injected, base frozen).

    ``cfg``: :class:`GuardSpaceConfig` fields. Works on a plain transformers model or on a PeftModel with LoRA.
    The projector runs in every forward here (``projection="forward"``: nothing else would apply it); a
    SafeguardCallback with a ``guardspace`` section switches the model to the cheaper per-step projection.
    """
    artifact = _load_artifact(artifact_or_path)
    artifact.check_model(model, strict=strict_fingerprint)
    cfg.setdefault("projection", "forward")  # no callback runs after_step here; the callback switches it to 'step'
    gs = GuardSpace(GuardSpaceConfig(**cfg), artifact)
    gs.validate_model(model)
    gs.modify_model(model)
    return model


def _layer_state(layer) -> dict[str, torch.Tensor]:
    a = layer.lora_A[layer.gs_adapter]
    return {"lora_A": a.weight.detach(), "lora_B": layer.lora_B[layer.gs_adapter].weight.detach(),
            "init_A": a.gs_init_A, "init_B": a.gs_init_B}


def save_guardspace(model: nn.Module, out_dir: str | os.PathLike, export_lora: bool = True) -> Path:
    """Write the GuardSpace adapter of ``model`` to ``out_dir``.

    * ``guardspace.safetensors`` / ``guardspace.json``: trainable A, B, the projector basis and the init factors
      (for :func:`load_guardspace`: resume training, identical outputs).
    * with ``export_lora``: ``adapter_model.safetensors`` / ``adapter_config.json``, a standard PEFT LoRA adapter of
      rank 2r on the *original* base weights with the projector and the residual folded in — loadable by
      ``PeftModel.from_pretrained(base, out_dir)`` (or vLLM, transformers ``load_adapter``) with identical outputs.
    """
    from safetensors.torch import save_file

    layers = guardspace_layers(model)
    if not layers:
        raise GuardSpaceError("save_guardspace: the model has no GuardSpace layers")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    info: dict[str, Any] = {"format": 1, "layers": {}}
    basis_names: dict[int, str] = {}  # layers reading the same input share one projector basis
    for key, layer in layers.items():
        for name, t in _layer_state(layer).items():
            tensors[f"{key}.{name}"] = t.detach().to("cpu").contiguous()
        basis = layer.lora_A[layer.gs_adapter].gs_basis
        bname = None
        if basis is not None:
            bname = basis_names.setdefault(basis.data_ptr(), f"basis.{key}")
            if bname not in tensors:
                tensors[bname] = basis.detach().to("cpu").contiguous()
        info["layers"][key] = {"r": layer.r[layer.gs_adapter], "lora_alpha": layer.lora_alpha[layer.gs_adapter],
                               "scaling": layer.scaling[layer.gs_adapter], "mode": layer.gs_mode,
                               "basis": bname, "fan_in_fan_out": bool(layer.fan_in_fan_out)}
    save_file(tensors, str(out / SAVE_TENSORS), metadata={"format": "pt", "guardspace": "1"})
    (out / SAVE_META).write_text(json.dumps(info, indent=2) + "\n")
    if export_lora:
        _export_lora(model, layers, out)
    return out


@torch.no_grad()
def _export_lora(model: nn.Module, layers: dict[str, nn.Module], out: Path) -> None:
    from peft import LoraConfig
    from safetensors.torch import save_file

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    prefix = _blocks_prefix(base)
    tensors, targets, alphas = {}, [], {}
    rank = None
    for key, layer in layers.items():
        a = layer.lora_A[layer.gs_adapter]
        r = layer.r[layer.gs_adapter]
        rank = rank or r
        if r != rank:
            raise GuardSpaceError("export: layers with different ranks are not supported")
        s = layer.scaling[layer.gs_adapter]
        A2 = torch.cat([a.projected_weight().float(), a.gs_init_A.float()], 0)  # [A P; A₀P]
        B2 = torch.cat([layer.lora_B[layer.gs_adapter].weight.float(), -a.gs_init_B.float()], 1)  # [B, −B₀]
        path = f"{prefix}.{key}"
        targets.append(path)
        alphas[path] = s * 2 * r
        tensors[f"base_model.model.{path}.lora_A.weight"] = A2.contiguous().cpu()
        tensors[f"base_model.model.{path}.lora_B.weight"] = B2.contiguous().cpu()
    # scaling of the rank-2r adapter must equal each layer's s: alpha' = s·2r
    alpha_values = sorted(set(alphas.values()))
    lcfg = LoraConfig(r=2 * rank, lora_alpha=alpha_values[0],
                      alpha_pattern={} if len(alpha_values) == 1 else alphas, target_modules=sorted(targets),
                      lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                      base_model_name_or_path=getattr(getattr(base, "config", None), "_name_or_path", None))
    lcfg.save_pretrained(str(out))
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})


def load_guardspace(base_model: nn.Module, adapter_dir: str | os.PathLike, adapter_name: str = "default",
                    is_trainable: bool = True) -> nn.Module:
    """Rebuild the GuardSpace model saved by :func:`save_guardspace` on the *original* base model (in place).

    The residual weights are recomputed exactly as PEFT's ``corda_init`` did (W − s·B₀·A₀P), the projector and the
    trainable factors restored: outputs are identical to the saved model's.
    """
    from peft import LoraConfig, inject_adapter_in_model
    from safetensors.torch import load_file

    d = Path(adapter_dir)
    if guardspace_layers(base_model):
        raise GuardSpaceError("load_guardspace: the model already has GuardSpace layers; pass the original base model")
    if not (d / SAVE_META).is_file():
        raise GuardSpaceError(f"{d} holds no {SAVE_META} (not written by save_guardspace)")
    info = json.loads((d / SAVE_META).read_text())
    tensors = load_file(str(d / SAVE_TENSORS))
    prefix = _blocks_prefix(base_model)
    by_rank: dict[tuple[int, float], list[str]] = {}
    for key, li in info["layers"].items():
        by_rank.setdefault((li["r"], li["lora_alpha"]), []).append(key)
    if len(by_rank) != 1:
        raise GuardSpaceError("load_guardspace: layers with different ranks/alphas are not supported")
    (r, alpha), keys = next(iter(by_rank.items()))
    lcfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=sorted(f"{prefix}.{k}" for k in keys),
                      init_lora_weights=False, lora_dropout=0.0, bias="none")
    inject_adapter_in_model(lcfg, base_model, adapter_name=adapter_name)
    from ..modeling import find_decoder_layers

    blocks = find_decoder_layers(base_model)
    dense_cache: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for key in keys:
            i, _, name = key.partition(".")
            layer = blocks[int(i)].get_submodule(name)
            li = info["layers"][key]
            dev = layer.lora_A[adapter_name].weight.device
            init_A = tensors[f"{key}.init_A"].to(dev)
            init_B = tensors[f"{key}.init_B"].to(dev)
            layer.scaling[adapter_name] = li["scaling"]  # rsLoRA or custom scaling
            layer.lora_A[adapter_name].weight.copy_(init_A)
            layer.lora_B[adapter_name].weight.copy_(init_B)
            if li["mode"] == "weights":  # same arithmetic as peft's corda_init
                from peft.utils.other import transpose

                base = layer.get_base_layer()
                delta = layer.scaling[adapter_name] * layer.lora_B[adapter_name].weight @ layer.lora_A[adapter_name].weight
                delta = transpose(delta, fan_in_fan_out=layer.fan_in_fan_out)
                base.weight.data = (base.weight.data.to(torch.float32) - delta).to(base.weight.dtype)
            basis = tensors[li["basis"]] if li["basis"] else None
            _install(layer, adapter_name, li["mode"], basis, dense_cache)
            layer.lora_A[adapter_name].weight.copy_(tensors[f"{key}.lora_A"].to(dev))
            layer.lora_B[adapter_name].weight.copy_(tensors[f"{key}.lora_B"].to(dev))
    for n, p in base_model.named_parameters():
        p.requires_grad_(is_trainable and "lora_" in n)
    return base_model


@torch.no_grad()
def restore_guardspace_factors(model: nn.Module, folder: str | os.PathLike) -> bool:
    """Copy the trainable factors :func:`save_guardspace` wrote to ``folder`` into ``model``'s GuardSpace layers (set
    up from the same artifact and config, e.g. by the callback of a resumed run); False when ``folder`` holds no
    GuardSpace save. The initial factors and projector bases must match the saved ones: the residual weights were
    derived from them."""
    from safetensors.torch import load_file

    d = Path(folder)
    if not (d / SAVE_META).is_file():
        return False
    layers = guardspace_layers(model)
    info = json.loads((d / SAVE_META).read_text())
    tensors = load_file(str(d / SAVE_TENSORS))
    fix = ("resume with the artifact and the guardspace settings (rank, target_modules, null_energy, residual) of the "
           "run that wrote it, or load it into the original base model with load_guardspace(base_model, folder)")
    if set(info["layers"]) != set(layers):
        missing, extra = sorted(set(info["layers"]) - set(layers)), sorted(set(layers) - set(info["layers"]))
        raise GuardSpaceError(f"{d}: the saved GuardSpace layers differ from this model's (saved only: "
                              f"{missing[:4]}, model only: {extra[:4]}); {fix}")
    for key, li in info["layers"].items():
        layer = layers[key]
        a = layer.lora_A[layer.gs_adapter]
        same = (li["r"] == layer.r[layer.gs_adapter] and li["mode"] == layer.gs_mode
                and (li["basis"] is None) == (a.gs_basis is None))
        saved_init = {"init_A": tensors[f"{key}.init_A"], "init_B": tensors[f"{key}.init_B"]}
        if li["basis"] is not None and same:
            saved_init["basis"] = tensors[li["basis"]]
        for name, t in saved_init.items():
            cur = a.gs_basis if name == "basis" else getattr(a, f"gs_{name}")
            same = same and cur.shape == t.shape and torch.allclose(cur.float().cpu(), t.float(), rtol=1e-4,
                                                                     atol=1e-6 * float(t.float().abs().max()) + 1e-12)
        if not same:
            raise GuardSpaceError(f"{d}: layer {key} was saved from another GuardSpace set-up (rank, mode, projector "
                                  f"or initial factors differ: the residual weights would not match); {fix}")
        a.weight.copy_(tensors[f"{key}.lora_A"].to(a.weight.device, a.weight.dtype))
        b = layer.lora_B[layer.gs_adapter]
        b.weight.copy_(tensors[f"{key}.lora_B"].to(b.weight.device, b.weight.dtype))
    logger.info("guardspace: restored the trained factors of %d layers from %s", len(layers), d)
    return True


@torch.no_grad()
def merge_guardspace(model: nn.Module) -> nn.Module:
    """Merge for deployment: W ← W_res + s·B·A·P (offset mode: W + s·(BA − B₀A₀)·P); returns the plain model.

    Uses PEFT's ``merge`` with the GuardSpace ``get_delta_weight`` (projector included), then replaces each LoRA
    layer by its base layer. A PeftModel is unwrapped (``merge_and_unload``).
    """
    layers = guardspace_layers(model)
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    for _key, layer in layers.items():
        if not _base_dtype_is_float(layer.get_base_layer()):
            raise GuardSpaceError("merge_guardspace: quantized base weights; load the base in bf16/fp32 first "
                                  "(load_guardspace) and merge there")
        layer.merge(adapter_names=[layer.gs_adapter])
    names = [(n, m) for n, m in model.named_modules() if isinstance(m, GuardSpaceLayerMixin)]
    for n, m in names:
        parent_name, _, child = n.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, m.get_base_layer())
    if hasattr(model, "peft_config"):
        try:
            del model.peft_config
        except AttributeError:
            pass
    return model


__all__ = [
    "GuardSpace", "GuardSpaceConfig", "GuardSpaceError", "NullSpaceLoraA", "calibrate_guardspace",
    "compute_guardspace", "guardspace_layers", "load_guardspace", "merge_guardspace", "prepare_guardspace_model",
    "restore_guardspace_factors", "save_guardspace",
]


# ================================================================================================ benchmark
def benchmark_step_time(hidden: int = 256, layers: int = 4, rank: int = 8, batch: int = 8, seq: int = 128,
                        steps: int = 20, repeats: int = 3, null_energy: float = 0.01, threads: int | None = None,
                        seed: int = 0, model: str | None = None, artifact: str | None = None,
                        massive_share: float | None = None) -> dict[str, float]:
    """Median optimizer-step time (forward + backward + AdamW) of plain PEFT LoRA vs GuardSpace at the same rank,
    targets and alpha, with the projector per optimizer step ('step', the callback's default) and per forward
    ('forward'). All three models live in one process and take their steps in turn (the order rotates every step),
    so a slow phase of the machine hits all of them alike. ``model``: a model spec (``load_model_spec``) with its
    GuardSpace ``artifact`` folder; default: a tiny random model calibrated here. ``steps * repeats`` timed steps
    each, after 2 warm-up steps."""
    import statistics

    from peft import LoraConfig, inject_adapter_in_model

    from ..artifacts import Artifact
    from ..data import load_prompts
    from ..modeling import load_model_spec

    prev = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        def fresh():
            return load_model_spec(model or "tiny", hidden=hidden, layers=layers)

        base, tok = fresh()
        if artifact is None:
            art = calibrate_guardspace(base, tok, load_prompts("harmful").train[:8],
                                       config={"null_energy": null_energy, "calibration_rank": rank,
                                               "massive_share": massive_share}, progress=False, check=False)
            extra = {"min_null_dim": 1, "max_null_fraction": 1.0}
        else:
            art, extra = Artifact.load(artifact), {}
        vocab = base.config.vocab_size
        models: dict[str, nn.Module] = {}
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]), base)
        for n, p in base.named_parameters():
            p.requires_grad_("lora_" in n)
        models["lora"] = base
        for proj in ("step", "forward"):
            m = fresh()[0]
            gs = GuardSpace(GuardSpaceConfig(rank=rank, null_energy=null_energy, massive_share=massive_share,
                                             projection=proj, **extra), art)
            gs.validate_model(m)
            gs.modify_model(m)  # 'step' in a bare loop: the version check projects A after each update
            models[f"guardspace_{proj}"] = m
        data = torch.randint(3, min(vocab, 32000), (batch, seq), generator=torch.Generator().manual_seed(seed))
        opts = {k: torch.optim.AdamW([p for p in v.parameters() if p.requires_grad], lr=1e-4) for k, v in models.items()}
        times: dict[str, list[float]] = {k: [] for k in models}
        kinds = list(models)
        for i in range(2 + steps * repeats):
            order = kinds[i % len(kinds):] + kinds[: i % len(kinds)]
            for kind in order:
                mdl, opt = models[kind], opts[kind]
                mdl.train()
                t = time.perf_counter()
                mdl(input_ids=data, labels=data).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if i >= 2:
                    times[kind].append(time.perf_counter() - t)
        out: dict[str, Any] = {f"{k}_median_s": statistics.median(v) for k, v in times.items()}
        for k in kinds[1:]:
            out[f"{k}_ratio"] = out[f"{k}_median_s"] / out["lora_median_s"]
            # per-round ratios (the same round of the rotation): their median is robust to slow phases
            out[f"{k}_paired_ratio"] = statistics.median(a / b for a, b in zip(times[k], times["lora"]))
        out.update(model=model or f"tiny(hidden={hidden}, layers={layers})", rank=rank, batch=batch, seq=seq,
                   steps=steps * repeats, threads=torch.get_num_threads())
        return out
    finally:
        torch.set_num_threads(prev)


if __name__ == "__main__":  # python -m safeguard_plugin.constraints.guardspace [--model M --artifact DIR ...]
    import argparse

    ap = argparse.ArgumentParser(description="GuardSpace vs plain LoRA step time (same rank), interleaved steps")
    for name, default in (("hidden", 256), ("layers", 4), ("rank", 8), ("batch", 8), ("seq", 128), ("steps", 20),
                          ("repeats", 3), ("threads", 0)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--null-energy", type=float, default=0.01)
    ap.add_argument("--massive-share", type=float, default=None)
    ap.add_argument("--model", default=None, help="model spec (default: a tiny random model)")
    ap.add_argument("--artifact", default=None, help="GuardSpace artifact for --model (default: calibrate here)")
    a = ap.parse_args()
    print(json.dumps(benchmark_step_time(a.hidden, a.layers, a.rank, a.batch, a.seq, a.steps, a.repeats,
                                         a.null_energy, a.threads or None, model=a.model, artifact=a.artifact,
                                         massive_share=a.massive_share), indent=2))
