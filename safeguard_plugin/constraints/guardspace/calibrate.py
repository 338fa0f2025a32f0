"""GuardSpace calibration: harmful-input covariances, the CorDA-kpm decomposition and the null-space range bases
(the ``guardspace`` artifact component; see the package docstring for the maths)."""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from torch import nn

from ...errors import SafeguardRuntimeError
from ...modeling import dense_weight, is_lora_layer, iter_block_linears, matches_targets
from .config import COMPONENT, GuardSpaceConfig, GuardSpaceError, _config

_DEDUP_PREFIX = True  # count the prompts' common prefix once (weight N); switch for tests
EXACT_EIGH_MAX = 2048  # larger covariances use a randomized range finder (the range side is the small one)


def _target_linears(model: nn.Module, targets) -> list[tuple[int, str, nn.Module]]:
    """``[(layer index, in-block name, Linear)]`` for the configured targets (decoder blocks only)."""
    out = []
    for i, name, mod in iter_block_linears(model):
        if is_lora_layer(mod):
            raise GuardSpaceError("guardspace calibration needs the base model, without PEFT adapters")
        if matches_targets(name, targets):
            out.append((i, name, mod))
    if not out:
        raise GuardSpaceError(f"guardspace: no nn.Linear inside the decoder blocks matches target_modules={targets}")
    return out


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

    from ...modeling import StopForward, find_decoder_layers, pad_right, run_until, tokenize_prompts

    cfg = config or GuardSpaceConfig()
    t0 = time.perf_counter()
    prompts = prompts[: cfg.calibration.max_prompts] if cfg.calibration.max_prompts else list(prompts)
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
    # layers are split into passes that each fit calibration.max_covariance_gb (each re-runs the model's prefix)
    per_layer: dict[int, int] = {}
    for i in sorted({i for i, _n, _m in targets}):
        dims = {mod.in_features for j, _n, mod in targets if j == i}
        per_layer[i] = sum(d * d * 8 for d in dims)
    budget = cfg.calibration.max_covariance_gb * 2 ** 30
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
                    W = dense_weight(mods[key]).to(C.device)  # float32, dequantised for a quantised (QLoRA) base
                    # W·C_d: float32 product for wide layers (kept σ ≥ 1e-5 σ_max, else a full SVD is used)
                    M = (W @ C.float()).double() if W.shape[1] > EXACT_EIGH_MAX else W.double() @ C
                    U, S, Vh, sig2 = _smallest_components(M, cfg.calibration.calibration_rank)
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
        "calibration_rank": cfg.calibration.calibration_rank,
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
    from ...artifacts import Artifact

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
        from .constraint import GuardSpace  # the constraint imports this module

        GuardSpace(cfg, artifact)  # the plan raises on an empty / near-identity null space
    if out_dir is not None:
        artifact.save(out_dir)
    return artifact
