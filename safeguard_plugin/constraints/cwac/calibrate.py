"""CWAC calibration: safety subspaces per weight matrix (refusal-gradient sketch or alignment delta) and the SAE with
its safety-critical features."""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ...modeling import dense_weight, is_lora_layer, iter_block_linears
from .config import SAE, SAE_DIR, CWACConfig, CWACError

if TYPE_CHECKING:
    from ..base import CalibrationContext

logger = logging.getLogger("safeguard_plugin")

def target_linears(model: nn.Module, targets="all-linear") -> dict[str, nn.Module]:
    """``{"<layer>.<in-block name>": module}`` for the decoder blocks' linear layers (LoRA-wrapped ones included)."""
    return {f"{i}.{name}": mod for i, name, mod in iter_block_linears(model, targets)}


def _base_linear(mod: nn.Module) -> nn.Module:
    return mod.get_base_layer() if is_lora_layer(mod) else mod


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
    from ...data import refusal_texts
    from ...modeling import pad_right, tokenize_prompts

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
    if any(is_lora_layer(m) for m in mods.values()):
        raise CWACError("cwac calibration needs the model without PEFT adapters")
    gen = torch.Generator().manual_seed(0)
    s = cfg.calibration.sketch_size or 4 * cfg.calibration.max_rank + 32
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
        kL, eL = _rank_for(lamL, sk.trace, cfg.calibration.energy, cfg.calibration.max_rank, cfg.rank)
        kR, eR = _rank_for(lamR, sk.trace, cfg.calibration.energy, cfg.calibration.max_rank, cfg.rank)
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
        W = dense_weight(m)  # float32, dequantised for a quantised model
        W0 = dense_weight(base[k]).to(W.device)
        if W.shape != W0.shape:
            raise CWACError(f"cwac: {k} is {tuple(W.shape)} in the aligned model, {tuple(W0.shape)} in the base model")
        D = (W - W0).cpu()
        total = float(D.double().pow(2).sum())
        if total == 0.0:
            layers[k] = {"module": k.split(".", 1)[1], "d_out": D.shape[0], "d_in": D.shape[1], "rank_left": 0,
                         "rank_right": 0, "energy_left": 0.0, "energy_right": 0.0, "unchanged_by_alignment": True}
            continue
        q = min(cfg.calibration.max_rank + 8, *D.shape)
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        U, S, V = torch.svd_lowrank(D, q=q, niter=4)
        kk, e = _rank_for(S.double() ** 2, total, cfg.calibration.energy, cfg.calibration.max_rank, cfg.rank)
        tensors[f"alignment.{k}.U"] = U[:, :kk].contiguous()
        tensors[f"alignment.{k}.V"] = V[:, :kk].contiguous()
        layers[k] = {"module": k.split(".", 1)[1], "d_out": D.shape[0], "d_in": D.shape[1], "rank_left": kk,
                     "rank_right": kk, "energy_left": round(e, 4), "energy_right": round(e, 4)}
    return tensors, {"seconds": round(time.time() - t0, 1), "layers": layers}


@torch.no_grad()
def _residual_activations(ctx, layer: int, prompts: list[str], desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens (N_tok, d), post-instruction (N, P, d))`` of decoder layer ``layer`` (all non-pad tokens but the first)."""
    from tqdm.auto import tqdm

    from ...modeling import capture_layers, pad_right, post_instruction_ids, run_until, tokenize_prompts

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


def calibrate_sae(ctx: CalibrationContext, artifact, cfg: CWACConfig) -> None:
    """Train (or load) the SAE, pick the safety-critical features, store both in the artifact."""
    from ...calibration import refusal_direction
    from ...sae import SparseAutoencoder, sae_quality, train_sae

    t0 = time.time()
    refusal_direction(ctx, artifact)
    _, rmeta = artifact.component("refusal_direction")
    if cfg.calibration.sae_layer == "auto":
        sel = sorted(rmeta["selected_layers"])
        layer = sel[len(sel) // 2]
    else:
        layer = int(cfg.calibration.sae_layer)
        if not 0 <= layer < rmeta["num_layers"]:
            raise CWACError(f"cwac.calibration.sae_layer={layer} is out of range (0..{rmeta['num_layers'] - 1})")
    th, ph = _residual_activations(ctx, layer, ctx.harmful.train, f"calibrate: cwac SAE acts layer {layer} (harmful)")
    ts, ps = _residual_activations(ctx, layer, ctx.harmless.train, f"calibrate: cwac SAE acts layer {layer} (harmless)")
    acts = torch.cat([th, ts], 0)
    d = acts.shape[1]
    hook_name = f"blocks.{layer}.hook_resid_post"
    if cfg.calibration.sae_path:
        sae = SparseAutoencoder.load(cfg.calibration.sae_path)
        if sae.d_in != d:
            raise CWACError(f"cwac.calibration.sae_path: the SAE has d_in={sae.d_in}, layer {layer} of the model "
                            f"has {d}")
        stats = sae_quality(sae, acts)
        source = str(cfg.calibration.sae_path)
    else:
        meta = {"model_name": artifact.manifest["model"]["id"], "hook_name": hook_name, "hook_layer": layer,
                "context_size": int(max(1, acts.shape[0])), "prepend_bos": False, "trained_by": "safeguard-plugin"}
        cal = cfg.calibration
        sae, stats = train_sae(acts, cal.sae_expansion * d, k=cal.sae_k, steps=cal.sae_steps, progress=ctx.progress,
                               metadata=meta)
        source = "trained"
    Fh, Fs = sae.encode(ph), sae.encode(ps)  # (N, P, d_sae)
    diff = Fh.mean(0) - Fs.mean(0)  # (P, d_sae)
    score = diff.abs().max(0).values
    n = min(cfg.calibration.sae_n_features, sae.d_sae)
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
