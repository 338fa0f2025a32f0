"""GuardSpace's runtime layers: the projected ``lora_A`` (:class:`NullSpaceLoraA`) and the class swap of PEFT's LoRA
layers (:class:`GuardSpaceLayerMixin`) that keeps merge, reference and offset behaviour exact."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...modeling import iter_block_linears
from .config import GuardSpaceError


def CordaEigens(S_WC: torch.Tensor, U_WC: torch.Tensor, V_WC: torch.Tensor):  # noqa: N802
    """The ``eigens`` record PEFT's ``corda_init`` reads (``peft.tuners.lora.corda.CordaEigens``; that module needs
    the undeclared ``attrs`` package, so the same three fields are given here)."""
    from types import SimpleNamespace

    return SimpleNamespace(S_WC=S_WC, U_WC=U_WC, V_WC=V_WC)


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

    def _project(self, w: torch.Tensor) -> torch.Tensor:
        """``w P`` computed in float32 (autocast off; the basis and P are kept in float32) and rounded once to ``w``'s
        dtype: with bf16 factors a bf16 product (or a bf16-rounded basis, whose P is no longer a projector) would leave
        a few 2^-8 of ``w`` in the protected subspace at every step."""
        with torch.autocast(w.device.type, enabled=False):
            wf = w.float()
            if self.gs_dense is not None and self.gs_dense.dtype == torch.float32:
                out = wf @ self.gs_dense
            else:  # also when a cast of the model (buffers included) rounded P: from the basis, in float32
                R = self.gs_basis.float()
                out = torch.addmm(wf, wf @ R, R.T, alpha=-1.0)  # A − (A R) Rᵀ = A P
        return out.to(w.dtype)

    def projected_weight(self) -> torch.Tensor:
        if self.gs_dense is None and self.gs_basis is None:
            return self.weight
        return self._project(self.weight)

    @torch.no_grad()
    def project_(self) -> None:
        """A ← A P in place (also the fp32 master copy under DeepSpeed)."""
        from ...distributed import get_full_param, set_full_param

        if self.gs_basis is None:
            return
        set_full_param(self.weight, self._project(get_full_param(self.weight)))  # float32 in, rounded once on write
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
    return {f"{i}.{name}": mod for i, name, mod in iter_block_linears(model) if isinstance(mod, GuardSpaceLayerMixin)}


def _blocks_prefix(model: nn.Module) -> str:
    from ...modeling import find_decoder_layers

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
    dev = src.weight.device
    init_A = src.weight.detach().clone()
    init_B = layer.lora_B[adapter].weight.detach().clone()
    key = id(basis)
    if basis is not None:  # float32 whatever the adapter's dtype: the projector maths stays exact (see _project)
        basis = basis.to(device=dev, dtype=torch.promote_types(basis.dtype, torch.float32))
    dense = _dense_projector(basis, dense_cache if dense_cache is not None else {}, key)
    layer.lora_A[adapter] = NullSpaceLoraA(src, basis, init_A, init_B, dense)
    layer.__class__ = _guardspace_class(type(layer))
    layer.gs_adapter = adapter
    layer.gs_mode = mode
