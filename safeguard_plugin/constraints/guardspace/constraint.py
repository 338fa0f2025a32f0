"""The GuardSpace constraint: LoRA surgery from the artifact (inject or convert), the per-step projection, and the
trainer-save hooks; :func:`prepare_guardspace_model` for scripts."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch
from torch import nn

from ...errors import SafeguardRuntimeError
from ...modeling import is_lora_layer, iter_block_linears, matches_targets
from ..base import CalibrationContext, Constraint, TrainContext
from .calibrate import _as_prompts, _range_size, compute_guardspace
from .config import COMPONENT, GuardSpaceConfig, GuardSpaceError, _config
from .io import restore_guardspace_factors, save_guardspace
from .layer import CordaEigens, _base_dtype_is_float, _blocks_prefix, _install, guardspace_layers

logger = logging.getLogger("safeguard_plugin")

class GuardSpace(Constraint):
    """Safety-preserving LoRA: CorDA-kpm init from harmful-prompt covariances + null-space projector (no penalty)."""

    name = "guardspace"
    config_class = GuardSpaceConfig
    metrics_read_params = True  # the update norm reads lora_A / lora_B (gathered under ZeRO-3 by the engine)
    calibrates_base_layers = True  # covariances and SVDs of the plain Linear layers
    calibration_note = ("input covariances and one SVD per Linear layer; 4.6 min for "
                        "128 prompts on Qwen2.5-0.5B, 2 CPU cores")
    owns_model_save = True  # a plain save drops the projector and the residual: the trainer's saves use save_model
    requires_lora_adapter = True  # trains the run's LoRA adapters (re-initialised, or injected into a plain model)
    requires_unfused_lora = True  # the projector runs inside the LoRA modules' forward (fused kernels bypass it)
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
        return matches_targets(self.meta["layers"][key]["module"], self.config.target_modules)

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
        return {f"{i}.{name}": mod for i, name, mod in iter_block_linears(model)
                if f"{i}.{name}" in self.meta["layers"] or is_lora_layer(mod)}

    def validate_model(self, model: nn.Module) -> None:
        from ...modeling import find_decoder_layers

        n = len(find_decoder_layers(model))
        if n != int(self.meta["num_layers"]):
            raise GuardSpaceError(f"guardspace: artifact has {self.meta['num_layers']} layers, the model {n}")
        mods = self._module_map(model)
        for key, lm in self.meta["layers"].items():
            mod = mods.get(key)
            if mod is None:
                continue  # not adapted here (e.g. the trainer's LoRA targets fewer modules)
            base = mod.get_base_layer() if is_lora_layer(mod) else mod
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
        lora = {k: m for k, m in mods.items() if is_lora_layer(m)}
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
                                  "re-calibrate with a larger guardspace.calibration.calibration_rank")
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
            sel = {k: m for k, m in wanted.items() if matches_targets(self.meta["layers"][k]["module"], cfg.target_modules)}
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

    # -- calibration
    @classmethod
    def calibrate(cls, ctx: CalibrationContext, artifact, config: GuardSpaceConfig | dict | None = None) -> None:
        if artifact.has(COMPONENT):
            return
        cfg = config if config is not None else ctx.constraint_configs.get(cls.name)
        if cfg is None:
            cfg = ctx.cache.get("guardspace_config")
        cfg = _config(cfg)
        tensors, meta = compute_guardspace(ctx.model, ctx.tokenizer, _as_prompts(ctx.harmful), cfg,
                                           batch_size=ctx.batch_size, progress=ctx.progress)
        artifact.add_component(COMPONENT, tensors, meta)
        logger.info("guardspace: calibrated %d modules on %d prompts in %.0fs; smallest null space %d dims",
                    meta["n_modules"], meta["n_prompts"], meta["seconds"], meta["min_null_dim_found"])


def _key_order(key: str) -> tuple[int, str]:
    i, _, name = key.partition(".")
    return int(i), name


def _load_artifact(artifact_or_path):
    from ...artifacts import Artifact

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
