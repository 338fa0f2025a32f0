"""Saving, reloading and merging a GuardSpace model: ``guardspace.json`` / ``guardspace.safetensors`` plus a
standard PEFT LoRA export with the projector folded in."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import GuardSpaceError
from .layer import GuardSpaceLayerMixin, _base_dtype_is_float, _blocks_prefix, _install, guardspace_layers

logger = logging.getLogger("safeguard_plugin")

SAVE_TENSORS = "guardspace.safetensors"
SAVE_META = "guardspace.json"


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
    from ...modeling import find_decoder_layers

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
