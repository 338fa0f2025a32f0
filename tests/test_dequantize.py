"""Quantised bases: calibration reads their weights through one dequantise path (``modeling.dense_weight``), run on CPU
with a fake 4-bit linear layer; bitsandbytes itself still gets its clear CPU refusal."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from safeguard_plugin.constraints.cwac import CWACConfig
from safeguard_plugin.constraints.cwac.calibrate import alignment_subspaces
from safeguard_plugin.constraints.guardspace.calibrate import compute_guardspace
from safeguard_plugin.constraints.guardspace.config import GuardSpaceConfig
from safeguard_plugin.errors import SafeguardRuntimeError
from safeguard_plugin.modeling import check_quantized_device, dense_weight, find_decoder_layers, linear_shape
from safeguard_plugin.testing import tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")


class FakeLinear4bit(nn.Linear):
    """A linear layer that stores its weight packed: two 4-bit codes per byte with a per-row scale and offset
    (asymmetric 4-bit quantisation), dequantised on demand (``W_q`` + ``dequantize()``, the interface of HQQ's layers,
    which PEFT's ``dequantize_module_weight`` reads). No float weight is kept."""

    def __init__(self, src: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = src.in_features, src.out_features
        W = src.weight.detach().float()
        lo, hi = W.min(1, keepdim=True).values, W.max(1, keepdim=True).values
        scale = ((hi - lo) / 15).clamp(min=1e-12)
        codes = ((W - lo) / scale).round().clamp(0, 15).to(torch.uint8)
        self.register_buffer("W_q", codes[:, 0::2] | (codes[:, 1::2] << 4))  # (out, in / 2) bytes
        self.register_buffer("q_scale", scale)
        self.register_buffer("q_zero", lo)
        self.register_parameter("weight", None)
        self.register_parameter("bias", None)

    def dequantize(self) -> torch.Tensor:
        codes = torch.stack([self.W_q & 15, self.W_q >> 4], -1).reshape(self.out_features, self.in_features)
        return codes.float() * self.q_scale + self.q_zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize().to(x.dtype))


def quantize_blocks(model: nn.Module) -> nn.Module:
    """Every Linear inside the decoder blocks replaced by a FakeLinear4bit of its weights."""
    for block in find_decoder_layers(model):
        for name, mod in list(block.named_modules()):
            if isinstance(mod, nn.Linear) and not isinstance(mod, FakeLinear4bit):
                parent, _, leaf = name.rpartition(".")
                setattr(block.get_submodule(parent) if parent else block, leaf, FakeLinear4bit(mod))
    return model


def dequantized_copy(quant: nn.Module) -> nn.Module:
    """A float model holding exactly the weights the quantised one computes with."""
    model = tiny_model()
    qblocks = find_decoder_layers(quant)
    for i, block in enumerate(find_decoder_layers(model)):
        for name, mod in block.named_modules():
            if isinstance(mod, nn.Linear):
                mod.weight.data.copy_(qblocks[i].get_submodule(name).dequantize())
    return model


def test_dense_weight_dequantises_packed_weights_and_reads_float_ones():
    lin = nn.Linear(8, 6)
    fake = FakeLinear4bit(lin)
    assert fake.weight is None and fake.W_q.dtype == torch.uint8 and fake.W_q.shape == (6, 4)
    W = dense_weight(fake)
    assert W.dtype == torch.float32 and W.shape == (6, 8) and linear_shape(fake) == (6, 8)
    assert torch.equal(W, fake.dequantize())
    step = float(fake.q_scale.max())
    assert (W - lin.weight).abs().max() <= step / 2 + 1e-6  # 4-bit: within half a quantisation step
    bf16 = nn.Linear(8, 6).to(torch.bfloat16)
    assert torch.equal(dense_weight(bf16), bf16.weight.float()) and dense_weight(bf16).dtype == torch.float32


def test_guardspace_calibration_of_a_quantised_base_equals_its_dequantised_weights(tok, harmful):
    quant = quantize_blocks(tiny_model())
    cfg = GuardSpaceConfig(null_energy=0.05, calibration={"calibration_rank": 8})
    tq, mq = compute_guardspace(quant, tok, harmful, cfg, progress=False)
    tf, mf = compute_guardspace(dequantized_copy(quant), tok, harmful, cfg, progress=False)
    assert set(tq) == set(tf) and mq["layers"] == mf["layers"]
    for k in tf:
        assert torch.allclose(tq[k].double(), tf[k].double(), rtol=1e-4, atol=1e-6), k


def test_cwac_alignment_subspace_of_a_quantised_model_equals_its_dequantised_weights():
    torch.manual_seed(3)
    base = tiny_model()
    aligned = tiny_model()
    with torch.no_grad():
        for p in find_decoder_layers(aligned).parameters():
            p.add_(torch.randn_like(p) * 0.05)
    quant = quantize_blocks(aligned)
    cfg = CWACConfig(calibration={"max_rank": 4})
    tq, mq = alignment_subspaces(quant, base, cfg)
    tf, mf = alignment_subspaces(dequantized_copy(quant), base, cfg)
    assert mq["layers"] == mf["layers"] and set(tq) == set(tf)
    for k in tf:  # the same subspace (singular vectors up to sign)
        assert torch.allclose((tq[k].T @ tf[k]).abs().diagonal(), torch.ones(tf[k].shape[1]), atol=1e-4), k


def test_bitsandbytes_weights_on_cpu_keep_their_clear_refusal():
    model = tiny_model()
    Params4bit = type("Params4bit", (nn.Parameter,), {})  # what bitsandbytes names its 4-bit weights
    block = find_decoder_layers(model)[0]
    block.self_attn.q_proj.weight = Params4bit(block.self_attn.q_proj.weight.data, requires_grad=False)
    with pytest.raises(SafeguardRuntimeError, match="QLoRA / bitsandbytes-quantized base weights on CPU are not "
                                                    "supported.*load the model unquantized"):
        check_quantized_device(model)
