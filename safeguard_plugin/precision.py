"""Mixed precision: the trainer's current loss scale, and the dense weight of a (possibly quantised) linear layer.

fp16 training multiplies the loss by a dynamic scale ``S`` before ``backward`` and divides the gradients by it before
the optimizer step (skipping the step when they overflow). The engine's injected penalty gradient does not come from
the trainer's loss, so it must be multiplied by the same ``S`` itself: :func:`trainer_loss_scale` reads ``S`` the way
the trainer applies it (accelerate's ``GradScaler`` or DeepSpeed's fp16 loss scaler), and the integrations give it to
the engine (:meth:`SafeguardEngine.set_loss_scale`).
"""

from __future__ import annotations

from typing import Any

import torch


def grad_scaler_scale(scaler: Any) -> float | torch.Tensor:
    """The current scale of a ``torch.amp.GradScaler`` (1.0 when it is disabled)."""
    if not scaler.is_enabled():
        return 1.0
    scale = getattr(scaler, "_scale", None)  # the live tensor: no device sync mid-backward (get_scale() calls .item())
    return scale if isinstance(scale, torch.Tensor) else scaler.get_scale()


def deepspeed_loss_scale(engine: Any) -> float | torch.Tensor:
    """The loss scale a DeepSpeed engine applies in ``engine.backward`` (its fp16 optimizer's ``cur_scale``; a torch
    autocast ``GradScaler`` when DeepSpeed uses one; 1.0 under bf16/fp32)."""
    opt = getattr(engine, "optimizer", None)
    if getattr(opt, "custom_loss_scaler", False):
        return float(opt.external_loss_scale)
    for scaler in (getattr(opt, "torch_autocast_gradscaler", None), getattr(engine, "torch_autocast_z0_gradscaler", None)):
        if scaler is not None:
            return grad_scaler_scale(scaler)
    cur = getattr(opt, "cur_scale", None)  # FP16_Optimizer and the ZeRO optimizers: loss_scaler.cur_scale
    return float(cur) if cur is not None else 1.0


def trainer_loss_scale(trainer: Any) -> float | torch.Tensor:
    """The loss scale a transformers ``Trainer`` applies in its current backward, following ``accelerator.backward``:
    DeepSpeed's engine when DeepSpeed runs the step, else accelerate's ``GradScaler`` (fp16), else 1.0."""
    acc = getattr(trainer, "accelerator", None)
    ds = getattr(getattr(acc, "deepspeed_engine_wrapped", None), "engine", None)
    if ds is not None:
        return deepspeed_loss_scale(ds)
    scaler = getattr(acc, "scaler", None)
    return grad_scaler_scale(scaler) if scaler is not None else 1.0
