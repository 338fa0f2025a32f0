"""Sparse autoencoders on a residual-stream layer, in SAELens' on-disk format.

An SAE folder is ``cfg.json`` + ``sae_weights.safetensors`` with ``W_enc (d_in, d_sae)``, ``b_enc (d_sae)``,
``W_dec (d_sae, d_in)``, ``b_dec (d_in)`` (and ``threshold`` for JumpReLU), exactly what
``sae_lens.SAE.save_model`` writes and ``SAE.load_from_disk`` reads. Encoding follows SAELens:
``pre = (x - b_dec·apply_b_dec_to_input) @ W_enc + b_enc``; standard: ``relu(pre)``; topk: ReLU of the ``k``
largest, zero elsewhere; jumprelu: ``pre · (pre > threshold)``.

:func:`train_sae` trains a small TopK SAE (no L1 coefficient to tune) on activations gathered by the caller.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from .errors import DataError

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"


def _sae_entries(folder: Path) -> set[str] | None:
    """An earlier SAELens folder (a readable cfg.json) may be replaced when it holds only these two files."""
    try:
        json.loads((folder / CFG_FILE).read_text())
    except (OSError, ValueError):
        return None
    return {CFG_FILE, WEIGHTS_FILE}
ARCHITECTURES = ("standard", "topk", "jumprelu")


class SparseAutoencoder(nn.Module):
    """Inference-side SAE (the maths SAELens applies for the supported architectures)."""

    def __init__(self, d_in: int, d_sae: int, architecture: str = "topk", k: int | None = 32,
                 apply_b_dec_to_input: bool = True, metadata: dict[str, Any] | None = None):
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise DataError(f"SAE architecture '{architecture}' is not supported (supported: {', '.join(ARCHITECTURES)})")
        if architecture == "topk" and not k:
            raise DataError("a topk SAE needs k")
        self.d_in, self.d_sae, self.architecture = int(d_in), int(d_sae), architecture
        self.k = int(k) if architecture == "topk" else None
        self.apply_b_dec_to_input = bool(apply_b_dec_to_input)
        self.metadata = dict(metadata or {})
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        if architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(d_sae))

    # -- maths
    def pre_activation(self, x: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """``(x - b_dec) W_enc + b_enc``, optionally only for the feature indices ``features``."""
        x = x.to(self.W_enc.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        if features is None:
            return x @ self.W_enc + self.b_enc
        return x @ self.W_enc[:, features] + self.b_enc[features]

    def encode(self, x: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """Feature activations ``(..., d_sae)``, or ``(..., len(features))`` for a subset (differentiable in x).
        TopK needs every pre-activation to know which features are in the top k; the others do not."""
        if self.architecture == "topk":
            pre = self.pre_activation(x)
            top = pre.topk(self.k, dim=-1)
            f = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
            return f if features is None else f[..., features]
        pre = self.pre_activation(x, features)
        if self.architecture == "standard":
            return pre.relu()
        thr = self.threshold if features is None else self.threshold[features]
        return pre * (pre > thr).to(pre.dtype)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    # -- SAELens format
    def cfg_dict(self) -> dict[str, Any]:
        cfg = {
            "architecture": self.architecture,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "dtype": "float32",
            "device": "cpu",
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "normalize_activations": "none",
            "reshape_activations": "none",
            "metadata": self.metadata,
        }
        if self.k is not None:
            cfg["k"] = self.k
        return cfg

    def to_files(self) -> dict[str, bytes]:
        """``{filename: bytes}`` of the SAELens folder."""
        sd = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        return {CFG_FILE: (json.dumps(self.cfg_dict(), indent=2) + "\n").encode(), WEIGHTS_FILE: st_save(sd)}

    def save(self, folder: str | os.PathLike) -> Path:
        """Write the SAELens folder atomically (a reader never sees a half-written SAE)."""
        from .artifacts import write_folder_atomic

        return write_folder_atomic(folder, self.to_files(), owned=_sae_entries, what="SAE folder")

    @classmethod
    def from_files(cls, cfg_bytes: bytes, weight_bytes: bytes, where: str = "SAE") -> SparseAutoencoder:
        try:
            cfg = json.loads(cfg_bytes)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: {CFG_FILE} is not valid JSON ({err})") from None
        arch = cfg.get("architecture", "standard")
        if arch not in ARCHITECTURES:
            raise DataError(f"{where}: architecture '{arch}' is not supported (supported: {', '.join(ARCHITECTURES)})")
        norm = cfg.get("normalize_activations", "none")
        if norm not in ("none", None):
            raise DataError(f"{where}: normalize_activations='{norm}' is not supported; use an SAE with 'none' "
                             "(or fold the normalisation into the weights)")
        if cfg.get("reshape_activations", "none") not in ("none", None):
            raise DataError(f"{where}: only residual-stream SAEs are supported (reshape_activations must be 'none')")
        k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
        sae = cls(int(cfg["d_in"]), int(cfg["d_sae"]), arch, k=k,
                  apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)), metadata=cfg.get("metadata") or {})
        sd = st_load(weight_bytes)
        missing = [n for n in sae.state_dict() if n not in sd]
        if missing:
            raise DataError(f"{where}: {WEIGHTS_FILE} lacks {', '.join(missing)}")
        for n, t in sae.state_dict().items():
            if tuple(sd[n].shape) != tuple(t.shape):
                raise DataError(f"{where}: {n} has shape {tuple(sd[n].shape)}, cfg.json implies {tuple(t.shape)}")
        sae.load_state_dict({n: sd[n].float() for n in sae.state_dict()})
        return sae

    @classmethod
    def load(cls, folder: str | os.PathLike) -> SparseAutoencoder:
        """Load an SAE folder in SAELens' format (``cfg.json`` + ``sae_weights.safetensors``)."""
        folder = Path(folder)
        for name in (CFG_FILE, WEIGHTS_FILE):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder} is not an SAELens SAE folder: {name} is missing")
        return cls.from_files((folder / CFG_FILE).read_bytes(), (folder / WEIGHTS_FILE).read_bytes(), str(folder))


@torch.no_grad()
def sae_quality(sae: SparseAutoencoder, acts: torch.Tensor, batch: int = 4096) -> dict[str, float]:
    """Explained variance ``1 - Σ‖x - x̂‖² / Σ‖x - x̄‖²``, mean L0, dead-feature fraction, on ``acts (N, d)``."""
    mean = acts.float().mean(0)
    err = tot = l0 = 0.0
    alive = torch.zeros(sae.d_sae, dtype=torch.bool)
    for s in range(0, acts.shape[0], batch):
        x = acts[s: s + batch].float()
        f = sae.encode(x)
        err += float((sae.decode(f) - x).pow(2).sum())
        tot += float((x - mean).pow(2).sum())
        nz = f > 0
        l0 += float(nz.sum())
        alive |= nz.any(0)
    n = max(1, acts.shape[0])
    return {"explained_variance": 1.0 - err / max(tot, 1e-12), "l0": l0 / n,
            "dead_fraction": 1.0 - float(alive.float().mean()), "n_tokens": int(acts.shape[0])}


def train_sae(acts: torch.Tensor, d_sae: int, k: int = 32, steps: int = 400, batch_size: int = 1024, lr: float = 1e-3,
              seed: int = 0, progress: bool = True, metadata: dict[str, Any] | None = None,
              heldout_frac: float = 0.1) -> tuple[SparseAutoencoder, dict[str, float]]:
    """Train a TopK SAE on ``acts (N, d)`` (float32) with Adam on the reconstruction MSE; decoder rows are kept at
    unit norm. Returns the SAE and its quality on a held-out ``heldout_frac`` of the tokens."""
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    acts = acts.float()
    perm = torch.randperm(acts.shape[0], generator=g)
    n_ho = int(acts.shape[0] * heldout_frac) if acts.shape[0] >= 20 else 0
    ho, tr = acts[perm[:n_ho]], acts[perm[n_ho:]]
    if tr.shape[0] == 0:
        raise DataError("train_sae: no activations to train on")
    d = acts.shape[1]
    k = min(k, d_sae)
    sae = SparseAutoencoder(d, d_sae, "topk", k=k, metadata=metadata)
    with torch.no_grad():
        W = torch.randn(d_sae, d, generator=g)
        W /= W.norm(dim=1, keepdim=True)
        sae.W_dec.copy_(W)
        sae.W_enc.copy_(W.T)
        sae.b_dec.copy_(tr.median(0).values)
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999))
    var = float((tr - tr.mean(0)).pow(2).sum(1).mean().clamp(min=1e-12))
    it = tqdm(range(steps), desc="calibrate: SAE training", unit="step", disable=not progress)
    for _ in it:
        idx = torch.randint(0, tr.shape[0], (min(batch_size, tr.shape[0]),), generator=g)
        x = tr[idx]
        loss = (sae(x) - x).pow(2).sum(1).mean() / var
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():  # remove the gradient component parallel to each decoder row (unit-norm constraint)
            Wd, gd = sae.W_dec, sae.W_dec.grad
            gd -= (gd * Wd).sum(1, keepdim=True) * Wd
        opt.step()
        with torch.no_grad():
            sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True).clamp(min=1e-8)
        if progress:
            it.set_postfix(fvu=f"{float(loss.detach()):.3f}")
    sae.requires_grad_(False)
    stats = sae_quality(sae, ho if n_ho else tr)
    stats["train_fvu_last"] = float(loss.detach())
    return sae, stats
