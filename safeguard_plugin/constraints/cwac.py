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
  Rank: fixed ``rank`` or the smallest k holding ``energy`` of the (exact) trace, capped at ``max_rank``.

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

from __future__ import annotations

import logging
import math
import time
import warnings
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from ..distributed import get_full_param, set_full_param
from ..errors import SafeguardError
from .base import BatchView, Constraint, ConstraintConfig, PenaltyWeight, TrainContext

logger = logging.getLogger("safeguard_plugin")

SUBSPACE = "cwac_subspace"
SAE = "cwac_sae"
SAE_DIR = "sae"


class CWACError(SafeguardError, ValueError):
    """A CWAC set-up that would not constrain training; the message names the fix."""


class CWACConfig(ConstraintConfig):
    # -- weight part
    projection: bool = Field(True, description="Keep weight updates out of the safety subspace (false: SAE term only).")
    subspace: Literal["auto", "alignment", "gradient"] = Field(
        "auto", description="Which calibrated subspace: 'auto' prefers 'alignment' (base-model delta) when present.")
    rank: int | None = Field(None, ge=1, description="Use at most this many stored directions per side (None: all).")
    sides: Literal["both", "left", "right"] = Field("both", description="Project out U (outputs), V (inputs) or both.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Linear layers inside the decoder blocks (suffixes such as 'q_proj').")
    # -- activation part
    sae_weight: PenaltyWeight = Field(1.0, description="λ of the SAE feature term (0: weight projection only).")
    n_features: int | None = Field(None, ge=1, description="Use the first n of the artifact's ranked safety features.")
    normalize: bool = Field(True, description="Divide feature changes by their calibration std.")
    # -- calibration only
    energy: float = Field(0.9, gt=0, le=1, description="Calibration: subspace rank = smallest k holding this energy.")
    max_rank: int = Field(16, ge=1, description="Calibration: cap on the subspace rank per side.")
    max_prompts: int = Field(128, ge=1, description="Calibration: harmful prompts for the gradient subspace.")
    sketch_size: int | None = Field(
        None, ge=1, description="Calibration: random-sketch width for the gradient subspace (None: 4·max_rank + 32).")
    sae_layer: int | Literal["auto"] = Field(
        "auto", description="Calibration: residual layer for the SAE ('auto': middle of the refusal-direction layers).")
    sae_path: str | None = Field(None, description="Calibration: an existing SAE folder in SAELens' format.")
    sae_expansion: int = Field(4, ge=1, le=64, description="Calibration: d_sae = expansion × hidden size.")
    sae_k: int = Field(32, ge=1, description="Calibration: TopK SAE sparsity.")
    sae_steps: int = Field(300, ge=1, description="Calibration: SAE optimizer steps (batch 1024 tokens).")
    sae_n_features: int = Field(32, ge=1, description="Calibration: safety-critical features stored.")


# ================================================================================================ helpers
def _is_lora_layer(mod: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(mod, LoraLayer)


def _targeted(name: str, targets) -> bool:
    return targets == "all-linear" or any(name == t or name.endswith("." + t) for t in targets)


def target_linears(model: nn.Module, targets="all-linear") -> dict[str, nn.Module]:
    """``{"<layer>.<in-block name>": module}`` for the decoder blocks' linear layers (LoRA-wrapped ones included)."""
    from ..modeling import find_decoder_layers

    out = {}
    for i, block in enumerate(find_decoder_layers(model)):
        for name, mod in block.named_modules():
            if "lora_" in name or name.endswith("base_layer"):
                continue
            if not (isinstance(mod, nn.Linear) or _is_lora_layer(mod)) or not _targeted(name, targets):
                continue
            out[f"{i}.{name}"] = mod
    return out


def _base_linear(mod: nn.Module) -> nn.Module:
    return mod.get_base_layer() if _is_lora_layer(mod) else mod


def nystrom_eig(Y: torch.Tensor, Omega: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top eigenpairs of a PSD matrix ``C`` from its sketch ``Y = C Ω`` (stable single-pass Nyström, Tropp et al.
    2017): ``(eigvals desc, eigvecs)``."""
    Y, Omega = Y.double(), Omega.double()
    nu = 2.2e-16 * math.sqrt(Y.shape[0]) * float(Y.norm())
    Yn = Y + nu * Omega
    B = Omega.T @ Yn
    B = (B + B.T) / 2
    try:
        L = torch.linalg.cholesky(B)
    except RuntimeError:  # near-singular core: shift the spectrum a little more
        ev = torch.linalg.eigvalsh(B)
        L = torch.linalg.cholesky(B + (abs(float(ev[0])) + nu) * 2 * torch.eye(B.shape[0], dtype=B.dtype))
    F = torch.linalg.solve_triangular(L, Yn.T, upper=False).T
    U, S, _ = torch.linalg.svd(F, full_matrices=False)
    lam = (S * S - nu).clamp(min=0)
    return lam, U


def _rank_for(lam: torch.Tensor, trace: float, energy: float, max_rank: int, fixed: int | None) -> tuple[int, float]:
    if fixed is not None:
        k = min(fixed, lam.numel())
    else:
        share = torch.cumsum(lam, 0) / max(trace, 1e-30)
        k = int((share < energy).sum()) + 1
        k = min(k, max_rank, lam.numel())
    k = max(1, k)
    return k, float(lam[:k].sum() / max(trace, 1e-30))


# ================================================================================================ calibration
class _GradSketch:
    """Single-pass sketches of Σ_i G_i G_iᵀ and Σ_i G_iᵀ G_i for one linear layer from its inputs and output grads."""

    def __init__(self, d_out: int, d_in: int, s: int, gen: torch.Generator):
        self.OL = torch.randn(d_out, s, generator=gen)
        self.OR = torch.randn(d_in, s, generator=gen)
        self.YL = torch.zeros(d_out, s, dtype=torch.float64)
        self.YR = torch.zeros(d_in, s, dtype=torch.float64)
        self.trace = 0.0

    @torch.no_grad()
    def add(self, X: torch.Tensor, D: torch.Tensor) -> None:
        X, D = X.float().cpu(), D.float().cpu()  # (B, T, d_in), (B, T, d_out); rows = examples
        OL, OR = self.OL, self.OR
        c = X @ torch.einsum("btd,bts->bds", X, D @ OL)  # X_i (X_iᵀ Δ_i Ω)
        self.YL += torch.einsum("bto,bts->os", D, c).double()
        c2 = D @ torch.einsum("bto,bts->bos", D, X @ OR)
        self.YR += torch.einsum("btd,bts->ds", X, c2).double()
        self.trace += float((torch.einsum("btd,bud->btu", X, X) * torch.einsum("bto,buo->btu", D, D)).double().sum())


def _refusal_batches(tokenizer, prompts: list[str], batch_size: int):
    from ..data import refusal_texts
    from ..modeling import pad_right, tokenize_prompts

    refusals = refusal_texts()
    prefixes = tokenize_prompts(tokenizer, prompts)
    eos = tokenizer.eos_token_id
    seqs, starts = [], []
    for i, pre in enumerate(prefixes):
        resp = tokenizer(refusals[i % len(refusals)], add_special_tokens=False)["input_ids"]
        seqs.append(pre + resp + ([eos] if eos is not None else []))
        starts.append(len(pre))
    for s in range(0, len(seqs), batch_size):
        chunk = seqs[s: s + batch_size]
        ids, mask = pad_right(chunk, tokenizer.pad_token_id or 0)
        labels = torch.full_like(ids, -100)
        for j, seq in enumerate(chunk):
            labels[j, starts[s + j]: len(seq)] = ids[j, starts[s + j]: len(seq)]
        yield ids, mask, labels


def gradient_subspaces(model: nn.Module, tokenizer, prompts: list[str], cfg: CWACConfig, batch_size: int = 8,
                       progress: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Safety subspaces from per-example refusal-likelihood gradients on harmful prompts (aligned model only)."""
    from tqdm.auto import tqdm

    mods = {k: m for k, m in target_linears(model, cfg.target_modules).items()}
    if not mods:
        raise CWACError(f"cwac: no linear layer in the decoder blocks matches target_modules={cfg.target_modules}")
    if any(_is_lora_layer(m) for m in mods.values()):
        raise CWACError("cwac calibration needs the model without PEFT adapters")
    gen = torch.Generator().manual_seed(0)
    s = cfg.sketch_size or 4 * cfg.max_rank + 32
    sketches = {k: _GradSketch(m.out_features, m.in_features, min(s, m.out_features, m.in_features), gen)
                for k, m in mods.items()}
    inputs: dict[str, torch.Tensor] = {}
    handles = []

    def fwd(key):
        def hook(_m, args, out):
            inputs[key] = args[0].detach()
            if out.requires_grad:
                out.register_hook(lambda g: sketches[key].add(inputs.pop(key), g))
        return hook

    for k, m in mods.items():
        handles.append(m.register_forward_hook(fwd(k)))
    emb = model.get_input_embeddings()
    handles.append(emb.register_forward_hook(lambda _m, _a, out: out.detach().requires_grad_(True)))
    was_training, req = model.training, {n: p.requires_grad for n, p in model.named_parameters()}
    model.eval()
    model.requires_grad_(False)
    device = next(model.parameters()).device
    t0 = time.time()
    n_batches = math.ceil(len(prompts) / batch_size)
    try:
        for ids, mask, labels in tqdm(_refusal_batches(tokenizer, prompts, batch_size), total=n_batches,
                                      desc="calibrate: cwac gradient subspace", unit="batch", disable=not progress):
            with torch.enable_grad():
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
                lp = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:].to(device),
                                                       ignore_index=-100, reduction="sum")
                lp.backward()
    finally:
        for h in handles:
            h.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(req[n])
        model.train(was_training)
    tensors, layers = {}, {}
    for k, sk in sketches.items():
        lamL, UL = nystrom_eig(sk.YL, sk.OL)
        lamR, UR = nystrom_eig(sk.YR, sk.OR)
        kL, eL = _rank_for(lamL, sk.trace, cfg.energy, cfg.max_rank, cfg.rank)
        kR, eR = _rank_for(lamR, sk.trace, cfg.energy, cfg.max_rank, cfg.rank)
        tensors[f"gradient.{k}.U"] = UL[:, :kL].float()
        tensors[f"gradient.{k}.V"] = UR[:, :kR].float()
        layers[k] = {"module": k.split(".", 1)[1], "d_out": mods[k].out_features, "d_in": mods[k].in_features,
                     "rank_left": kL, "rank_right": kR, "energy_left": round(eL, 4), "energy_right": round(eR, 4)}
    meta = {"n_prompts": len(prompts), "seconds": round(time.time() - t0, 1), "layers": layers}
    return tensors, meta


@torch.no_grad()
def alignment_subspaces(model: nn.Module, base_model: nn.Module, cfg: CWACConfig) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Safety subspaces from the alignment delta ``W_aligned − W_base`` (top singular vectors)."""
    t0 = time.time()
    mods = target_linears(model, cfg.target_modules)
    base = target_linears(base_model, cfg.target_modules)
    if set(mods) != set(base):
        raise CWACError("cwac: the base model's decoder layers differ from the aligned model's "
                        f"({len(base)} vs {len(mods)} target linears); give the pre-alignment checkpoint of the same architecture")
    tensors, layers = {}, {}
    gen = torch.Generator().manual_seed(0)
    for k, m in mods.items():
        W, W0 = _base_linear(m).weight.float(), _base_linear(base[k]).weight.float().to(m.weight.device)
        if W.shape != W0.shape:
            raise CWACError(f"cwac: {k} is {tuple(W.shape)} in the aligned model, {tuple(W0.shape)} in the base model")
        D = (W - W0).cpu()
        total = float(D.double().pow(2).sum())
        if total == 0.0:
            layers[k] = {"module": k.split(".", 1)[1], "d_out": D.shape[0], "d_in": D.shape[1], "rank_left": 0,
                         "rank_right": 0, "energy_left": 0.0, "energy_right": 0.0, "unchanged_by_alignment": True}
            continue
        q = min(cfg.max_rank + 8, *D.shape)
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        U, S, V = torch.svd_lowrank(D, q=q, niter=4)
        kk, e = _rank_for(S.double() ** 2, total, cfg.energy, cfg.max_rank, cfg.rank)
        tensors[f"alignment.{k}.U"] = U[:, :kk].contiguous()
        tensors[f"alignment.{k}.V"] = V[:, :kk].contiguous()
        layers[k] = {"module": k.split(".", 1)[1], "d_out": D.shape[0], "d_in": D.shape[1], "rank_left": kk,
                     "rank_right": kk, "energy_left": round(e, 4), "energy_right": round(e, 4)}
    return tensors, {"seconds": round(time.time() - t0, 1), "layers": layers}


@torch.no_grad()
def _residual_activations(ctx, layer: int, prompts: list[str], desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens (N_tok, d), post-instruction (N, P, d))`` of decoder layer ``layer`` (all non-pad tokens but the first)."""
    from tqdm.auto import tqdm

    from ..modeling import capture_layers, pad_right, post_instruction_ids, run_until, tokenize_prompts

    model, tok = ctx.model, ctx.tokenizer
    P = len(post_instruction_ids(tok))
    seqs = tokenize_prompts(tok, prompts)
    device = next(model.parameters()).device
    toks, post = [], []
    was = model.training
    model.eval()
    try:
        for s in tqdm(range(0, len(seqs), ctx.batch_size), desc=desc, unit="batch", disable=not ctx.progress):
            ids, mask = pad_right(seqs[s: s + ctx.batch_size], tok.pad_token_id or 0)
            with capture_layers(model, [layer]) as store:
                run_until(model, input_ids=ids.to(device), attention_mask=mask.to(device))
            a = store[layer].float().cpu()
            m = mask.bool().clone()
            m[:, 0] = False  # the first token (BOS / attention sink) has outlier norms
            toks.append(a[m])
            pos = (mask.sum(1) - P).unsqueeze(1) + torch.arange(P)
            post.append(a.gather(1, pos.unsqueeze(-1).expand(-1, -1, a.shape[-1])))
    finally:
        model.train(was)
    return torch.cat(toks, 0), torch.cat(post, 0)


def calibrate_sae(ctx, artifact, cfg: CWACConfig) -> None:
    """Train (or load) the SAE, pick the safety-critical features, store both in the artifact."""
    from ..calibration import refusal_direction
    from ..sae import SparseAutoencoder, sae_quality, train_sae

    t0 = time.time()
    refusal_direction(ctx, artifact)
    _, rmeta = artifact.component("refusal_direction")
    if cfg.sae_layer == "auto":
        sel = sorted(rmeta["selected_layers"])
        layer = sel[len(sel) // 2]
    else:
        layer = int(cfg.sae_layer)
        if not 0 <= layer < rmeta["num_layers"]:
            raise CWACError(f"cwac.sae_layer={layer} is out of range (0..{rmeta['num_layers'] - 1})")
    th, ph = _residual_activations(ctx, layer, ctx.harmful.train, f"calibrate: cwac SAE acts layer {layer} (harmful)")
    ts, ps = _residual_activations(ctx, layer, ctx.harmless.train, f"calibrate: cwac SAE acts layer {layer} (harmless)")
    acts = torch.cat([th, ts], 0)
    d = acts.shape[1]
    hook_name = f"blocks.{layer}.hook_resid_post"
    if cfg.sae_path:
        sae = SparseAutoencoder.load(cfg.sae_path)
        if sae.d_in != d:
            raise CWACError(f"cwac.sae_path: the SAE has d_in={sae.d_in}, layer {layer} of the model has {d}")
        stats = sae_quality(sae, acts)
        source = str(cfg.sae_path)
    else:
        meta = {"model_name": artifact.manifest["model"]["id"], "hook_name": hook_name, "hook_layer": layer,
                "context_size": int(max(1, acts.shape[0])), "prepend_bos": False, "trained_by": "safeguard-plugin"}
        sae, stats = train_sae(acts, cfg.sae_expansion * d, k=cfg.sae_k, steps=cfg.sae_steps, progress=ctx.progress,
                               metadata=meta)
        source = "trained"
    Fh, Fs = sae.encode(ph), sae.encode(ps)  # (N, P, d_sae)
    diff = Fh.mean(0) - Fs.mean(0)  # (P, d_sae)
    score = diff.abs().max(0).values
    n = min(cfg.sae_n_features, sae.d_sae)
    feats = score.topk(n).indices
    allf = torch.cat([Fh, Fs], 0)[..., feats]
    std = allf.std(0).clamp(min=1e-4)  # (P, n)
    for name, data in sae.to_files().items():
        artifact.add_file(f"{SAE_DIR}/{name}", data)
    artifact.add_component(SAE, {
        "features": feats.long(),
        "diff": diff[:, feats].contiguous(),
        "mean_harmful": Fh.mean(0)[:, feats].contiguous(),
        "mean_harmless": Fs.mean(0)[:, feats].contiguous(),
        "std": std.contiguous(),
        "score": score[feats].contiguous(),
    }, {
        "layer": layer, "hook_name": hook_name, "sae_dir": SAE_DIR, "source": source,
        "architecture": sae.architecture, "d_sae": sae.d_sae, "k": sae.k,
        "explained_variance": round(stats["explained_variance"], 4), "l0": round(stats["l0"], 2),
        "dead_fraction": round(stats["dead_fraction"], 4), "n_tokens": int(acts.shape[0]),
        "n_features": n, "seconds": round(time.time() - t0, 1),
        "selection_rule": "top-n by max over post-instruction positions of |mean f harmful - mean f harmless|",
    })
    logger.info("cwac SAE (%s) layer %d: d_sae=%d explained variance %.3f, L0 %.1f, dead %.1f%%; %d safety features",
                source, layer, sae.d_sae, stats["explained_variance"], stats["l0"], 100 * stats["dead_fraction"], n)


# ================================================================================================ constraint
class CWAC(Constraint):
    """Weight updates kept out of a safety subspace + SAE safety features held at their original values."""

    name = "cwac"
    config_class = CWACConfig
    requires = ()
    uses_reference = True
    calibrates_base_layers = True  # gradient subspaces of the plain Linear weights
    calibration_note = ("gradient subspaces (a backward per prompt) and an SAE; "
                        "3.1 min for 128 prompts on Qwen2.5-0.5B, 2 CPU cores")

    def __init__(self, config: CWACConfig, artifact):
        super().__init__(config, artifact)
        if not config.projection and config.sae_weight == 0:
            raise CWACError("cwac: both parts are off (projection: false and sae_weight: 0), so it would not change "
                            "training; enable one, or remove the cwac section")
        if artifact is None:
            raise CWACError("cwac needs a calibration artifact; set `artifact:` to a folder from `safeguard calibrate`")
        self.bases: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
        self.source = None
        if config.projection:
            self._load_subspaces()
        self.sae = None
        self._layer = None
        if config.sae_weight > 0:
            self._load_sae()
        else:
            self.uses_reference = False
        self._plan: list[dict[str, Any]] = []
        self._anchors: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
        self._sum_pen, self._sum_drift, self._n = 0.0, 0.0, 0
        self._n_edits = 0

    # -- artifact
    def _load_subspaces(self) -> None:
        tensors, meta = self.artifact.component(SUBSPACE)
        have = list(meta.get("sources", []))
        want = self.config.subspace
        if want == "auto":
            want = "alignment" if "alignment" in have else "gradient"
        if want not in have:
            raise CWACError(f"cwac.subspace='{self.config.subspace}': the artifact has {have or 'no'} subspaces; "
                            "calibrate with --base-model for 'alignment'")
        self.source = want
        k = self.config.rank
        for key, lm in meta[want]["layers"].items():
            if not _targeted(lm["module"], self.config.target_modules) or lm.get("unchanged_by_alignment"):
                continue
            U = tensors[f"{want}.{key}.U"].float()
            V = tensors[f"{want}.{key}.V"].float()
            if k is not None:
                U, V = U[:, :k], V[:, :k]
            self.bases[key] = (U if self.config.sides in ("both", "left") else None,
                               V if self.config.sides in ("both", "right") else None)
        if not self.bases:
            raise CWACError(f"cwac: the artifact's {want} subspace covers none of target_modules={self.config.target_modules}")

    def _load_sae(self) -> None:
        from ..sae import CFG_FILE, WEIGHTS_FILE, SparseAutoencoder

        tensors, meta = self.artifact.component(SAE)
        d = meta["sae_dir"]
        self.sae = SparseAutoencoder.from_files(self.artifact.read_file(f"{d}/{CFG_FILE}"),
                                                self.artifact.read_file(f"{d}/{WEIGHTS_FILE}"), f"artifact {d}/")
        self.sae.requires_grad_(False)
        n = self.config.n_features or int(meta["n_features"])
        if n > int(meta["n_features"]):
            raise CWACError(f"cwac.n_features={n} > the {meta['n_features']} features stored at calibration")
        self._layer = int(meta["layer"])
        self.features = tensors["features"][:n].long()
        std = tensors["std"][:, :n].float()  # (P, n) per position; ~0 where a feature is silent at a position
        # one scale per feature (RMS over positions): a per-position std of a feature that is silent there would turn
        # any small activation after fine-tuning into a huge z
        scale = std.pow(2).mean(0).sqrt().clamp(min=1e-3)
        self.std = scale.expand_as(std).clone() if self.config.normalize else torch.ones_like(std)

    # -- model
    def layers(self) -> list[int]:
        return [self._layer] if self.sae is not None else []

    def validate_model(self, model: nn.Module) -> None:
        from ..distributed import param_shape
        from ..modeling import find_decoder_layers

        n = len(find_decoder_layers(model))
        d = param_shape(model.get_input_embeddings().weight)[-1]
        if self.sae is not None:
            if self._layer >= n:
                raise CWACError(f"cwac: the SAE's layer {self._layer} does not exist (the model has {n} layers)")
            if self.sae.d_in != d:
                raise CWACError(f"cwac: the SAE has d_in={self.sae.d_in}, the model's hidden size is {d}")
        if self.bases:
            mods = target_linears(model, "all-linear")
            for key, (U, V) in self.bases.items():
                if key not in mods:
                    raise CWACError(f"cwac: the artifact's layer {key} does not exist in this model")
                w = _base_linear(mods[key]).weight
                shape = tuple(param_shape(w))  # ZeRO-3 partitions hold an empty tensor
                if (U is not None and U.shape[0] != shape[0]) or (V is not None and V.shape[0] != shape[1]):
                    raise CWACError(f"cwac: {key} is {shape} in the model; the artifact's subspace does not fit")

    def prepare(self, ctx: TrainContext) -> None:
        self._plan = []
        if not self.bases:
            return
        mods = target_linears(ctx.model, "all-linear")
        unprotected = []
        for key, mod in mods.items():
            U, V = self.bases.get(key, (None, None))
            if _is_lora_layer(mod):
                if getattr(mod, "use_dora", {}) and any(mod.use_dora.values()):
                    raise CWACError(f"cwac: DoRA adapters are not supported ({key}); use plain LoRA")
                adapters = [a for a in mod.lora_A if mod.lora_A[a].weight.requires_grad]
                if not adapters:
                    continue
                if U is None and V is None:
                    unprotected.append(key)
                    continue
                for a in adapters:
                    self._plan.append({"key": key, "kind": "lora", "A": mod.lora_A[a].weight, "B": mod.lora_B[a].weight,
                                       "U": U, "V": V, "scale": float(mod.scaling[a])})
            else:
                w = mod.weight
                if not w.requires_grad:
                    continue
                if U is None and V is None:
                    unprotected.append(key)
                    continue
                self._plan.append({"key": key, "kind": "full", "W": w, "U": U, "V": V})
        if not self._plan:
            raise CWACError(
                "cwac: weight projection is on but none of the model's trainable linear layers has a safety subspace "
                f"in the artifact ({len(self.bases)} calibrated layers, e.g. {next(iter(self.bases))}); calibrate "
                "the modules you train (cwac.target_modules), or set projection: false")
        if unprotected:
            warnings.warn(f"cwac: {len(unprotected)} trainable linear layers have no calibrated subspace and are not "
                          f"projected (e.g. {unprotected[:3]})", stacklevel=2)
        for item in self._plan:
            U, V = item["U"], item["V"]
            if item["kind"] == "lora":  # project the initial factors too: BA is outside the subspace from step 0
                self._check_lora_init(item)
                self._project_lora(item)
            elif item["key"] not in self._anchors:
                W = get_full_param(item["W"])
                self._anchors[item["key"]] = (None if U is None else U.to(W.device).T @ W,
                                              None if V is None else W @ V.to(W.device))
        logger.info("cwac: projecting %d weight matrices (%s subspace, sides=%s)", len(self._plan), self.source,
                    self.config.sides)

    @torch.no_grad()
    def _check_lora_init(self, item: dict[str, Any]) -> None:
        """Projecting the factors of an adapter whose product BA is not zero (PiSSA / CorDA / GuardSpace-style
        initialisations) would change the model before training; refuse. A resumed, already projected adapter passes."""
        A, B = get_full_param(item["A"]), get_full_param(item["B"])
        if float(B.abs().max()) == 0.0:
            return
        U, V = item["U"], item["V"]
        ref = float(B.norm() * A.norm()) + 1e-30
        moved = 0.0
        if U is not None:
            moved += float((U.to(B.device).T @ B).norm() * A.norm())
        if V is not None:
            moved += float(B.norm() * (A @ V.to(A.device)).norm())
        if moved / ref > 1e-4:
            raise CWACError(
                f"cwac: the adapter on {item['key']} starts with a non-zero update BA (a PiSSA / CorDA / GuardSpace-style "
                "initialisation); projecting its factors would change the model before training. Use a zero-initialised "
                "LoRA (PEFT's default), or set cwac.projection: false (SAE term only)")
    @torch.no_grad()
    def _project_lora(self, item: dict[str, Any]) -> None:
        U, V = item["U"], item["V"]
        if U is not None:
            B = get_full_param(item["B"])
            Ud = U.to(B.device)
            set_full_param(item["B"], B - Ud @ (Ud.T @ B))
        if V is not None:
            A = get_full_param(item["A"])
            Vd = V.to(A.device)
            set_full_param(item["A"], A - (A @ Vd) @ Vd.T)

    @torch.no_grad()
    def _project_full(self, item: dict[str, Any]) -> None:
        W = get_full_param(item["W"])
        U, V = item["U"], item["V"]
        aL, aR = self._anchors[item["key"]]
        Ud = U.to(W.device) if U is not None else None
        Vd = V.to(W.device) if V is not None else None
        a = Ud.T @ W - aL.to(W.device) if Ud is not None else None  # Uᵀ ΔW   (k × d_in)
        b = W @ Vd - aR.to(W.device) if Vd is not None else None  # ΔW V     (d_out × k)
        new = W
        if a is not None:
            new = new - Ud @ a
        if b is not None:
            new = new - b @ Vd.T
        if a is not None and b is not None:
            new = new + Ud @ (a @ Vd) @ Vd.T
        set_full_param(item["W"], new)

    def after_step(self, ctx: TrainContext) -> None:
        for item in self._plan:
            if item["kind"] == "lora":
                self._project_lora(item)
            else:
                self._project_full(item)
        self._n_edits += 1

    @torch.no_grad()
    def subspace_leak(self) -> float:
        """LoRA: the largest relative norm of an adapter update's component inside its safety subspace,
        (‖UᵀΔW‖ + ‖ΔW V‖) / ‖ΔW‖ with ΔW = BA, over the projected matrices; ≈ 0 while the projection holds."""
        worst = 0.0
        for item in self._plan:
            if item["kind"] != "lora":
                continue
            U, V = item["U"], item["V"]
            A, B = get_full_param(item["A"]), get_full_param(item["B"])
            tot = float(((B.T @ B) * (A @ A.T)).sum().clamp(min=0)) ** 0.5  # ‖BA‖_F without forming BA
            left = float((U.to(B.device).T @ B @ A).norm()) if U is not None else 0.0
            right = float((B @ (A @ V.to(A.device))).norm()) if V is not None else 0.0
            if tot > 0:
                worst = max(worst, (left + right) / tot)
        return worst

    # -- SAE term
    def _features(self, acts: dict[int, torch.Tensor]) -> torch.Tensor:
        h = acts[self._layer]  # (n, P, d)
        sae = self.sae
        if sae.W_enc.device != h.device:
            sae.to(h.device)
        return sae.encode(h.float(), self.features.to(h.device))  # (n, P, nS)

    def reference_values(self, acts: dict[int, torch.Tensor]) -> torch.Tensor:
        return self._features(acts)

    def penalty(self, batch: BatchView) -> torch.Tensor | None:
        if self.sae is None:
            return None
        mask = batch.ref_valid if batch.ref_valid is not None else batch.valid
        if not bool(mask.any()):
            return None
        f = self._features(batch.acts)[mask]
        ref = batch.reference[self.name][mask].to(f.device)
        z = (f - ref) / self.std.to(f.device)
        per_row = z.pow(2).mean(1).sum(-1)  # Σ_features mean_positions z², (rows,)
        # mean over rows; across ranks sum / (global rows / world size), so rank-averaged gradients match one process
        pen = self.config.sae_weight * per_row.sum() / batch.rows_denominator(per_row.shape[0])
        with torch.no_grad():
            self._sum_pen += float(pen)
            self._sum_drift += float(z.abs().mean())
            self._n += 1
        return pen

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self._n:
            out["cwac_sae_loss"] = self._sum_pen / self._n
            out["cwac_feature_drift"] = self._sum_drift / self._n
        if self._plan:
            out["cwac_projected_matrices"] = float(len(self._plan))
            if any(it["kind"] == "lora" for it in self._plan):
                out["cwac_subspace_leak"] = self.subspace_leak()
        self._sum_pen, self._sum_drift, self._n = 0.0, 0.0, 0
        return out

    # -- checkpoint state: full fine-tuning needs UᵀW₀ / W₀V of the original weights on resume
    def state_dict(self) -> dict[str, Any]:
        out = {}
        for key, (aL, aR) in self._anchors.items():
            if aL is not None:
                out[f"anchorL.{key}"] = aL
            if aR is not None:
                out[f"anchorR.{key}"] = aR
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        keys = {k.split(".", 1)[1] for k in state if k.startswith(("anchorL.", "anchorR."))}
        for key in keys:
            self._anchors[key] = (state.get(f"anchorL.{key}"), state.get(f"anchorR.{key}"))

    # -- benchmark / calibration
    @classmethod
    def benchmark_configs(cls) -> dict[str, dict]:
        # the coupled row first: "all combined" in the benchmark takes each constraint's first row
        return {"cwac": {}, "cwac_weight": {"sae_weight": 0.0}, "cwac_sae": {"projection": False}}

    @classmethod
    def combined_benchmark_config(cls, config: dict, others: dict) -> dict:
        if any(o.nonzero_adapter_init for o in others.values()):
            # the factor projection refuses adapters that start non-zero: keep the SAE term, and leave the update
            # restriction to the constraint that built those adapters (GuardSpace's null-space projector)
            return {**config, "projection": False}
        return config

    @classmethod
    def calibrate(cls, ctx, artifact, config: CWACConfig | dict | None = None) -> None:
        cfg = config if config is not None else (getattr(ctx, "constraint_configs", None) or {}).get(cls.name)
        cfg = cfg if isinstance(cfg, CWACConfig) else CWACConfig(**(cfg or {}))
        if not artifact.has(SUBSPACE):
            tensors, meta = gradient_subspaces(ctx.model, ctx.tokenizer, ctx.harmful.train[: cfg.max_prompts], cfg,
                                               batch_size=max(1, ctx.batch_size // 2), progress=ctx.progress)
            comp_meta = {"sources": ["gradient"], "gradient": meta, "energy": cfg.energy, "max_rank": cfg.max_rank,
                         "target_modules": cfg.target_modules}
            base = getattr(ctx, "base_model", None)
            if base is not None:
                t2, m2 = alignment_subspaces(ctx.model, base, cfg)
                tensors.update(t2)
                comp_meta["sources"].append("alignment")
                comp_meta["alignment"] = m2
            artifact.add_component(SUBSPACE, tensors, comp_meta)
            ranks = [lm["rank_left"] for lm in meta["layers"].values()]
            logger.info("cwac: gradient subspaces for %d matrices in %.0fs (rank %d..%d)%s", len(ranks), meta["seconds"],
                        min(ranks), max(ranks), "; alignment subspaces from the base model" if base is not None else "")
        if not artifact.has(SAE):
            calibrate_sae(ctx, artifact, cfg)
