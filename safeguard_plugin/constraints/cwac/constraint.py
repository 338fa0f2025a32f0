"""The CWAC constraint: exact projection of weight updates out of the safety subspaces after every step, and the SAE
feature penalty."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from torch import nn

from ...distributed import get_full_param, set_full_param
from ...modeling import is_lora_layer, linear_shape, matches_targets
from ..base import BatchView, CalibrationContext, Constraint, TrainContext
from .calibrate import alignment_subspaces, calibrate_sae, gradient_subspaces, target_linears
from .config import SAE, SUBSPACE, CWACConfig, CWACError

logger = logging.getLogger("safeguard_plugin")

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
            if not matches_targets(lm["module"], self.config.target_modules) or lm.get("unchanged_by_alignment"):
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
        from ...sae import CFG_FILE, WEIGHTS_FILE, SparseAutoencoder

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
        from ...distributed import param_shape
        from ...modeling import find_decoder_layers

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
                shape = linear_shape(mods[key])  # also for a quantised (packed) or ZeRO-3-partitioned weight
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
            if is_lora_layer(mod):
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

    # -- calibration
    @classmethod
    def calibrate(cls, ctx: CalibrationContext, artifact, config: CWACConfig | dict | None = None) -> None:
        cfg = config if config is not None else ctx.constraint_configs.get(cls.name)
        cfg = cfg if isinstance(cfg, CWACConfig) else CWACConfig(**(cfg or {}))
        if not artifact.has(SUBSPACE):
            cal = cfg.calibration
            tensors, meta = gradient_subspaces(ctx.model, ctx.tokenizer, ctx.harmful.train[: cal.max_prompts], cfg,
                                               batch_size=max(1, ctx.batch_size // 2), progress=ctx.progress)
            comp_meta = {"sources": ["gradient"], "gradient": meta, "energy": cal.energy, "max_rank": cal.max_rank,
                         "target_modules": cfg.target_modules}
            base = ctx.base_model
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
