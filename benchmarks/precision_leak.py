"""Post-step projections under bf16 parameters: the update's leak into the protected subspace over N steps.

A tiny random Qwen2 (CPU) is trained for N AdamW steps on arithmetic chat examples with CWAC's weight projection
(LoRA and full fine-tuning) and GuardSpace's null-space projection (LoRA), once with float32 parameters and once with
bfloat16 ones (the LoRA factors / the full weights in bf16, as a model loaded and trained in bf16 without fp32 master
weights). The constraints project in float32 and round once to the parameter dtype; the ``naive bf16`` rows do the same
projection in bf16 arithmetic with a bf16-rounded basis instead (what fp32-free maths would give), for comparison.

Leak after each step, the largest over the projected matrices:

* CWAC LoRA: ``cwac_subspace_leak`` = (‖UᵀBA‖ + ‖BA V‖) / ‖BA‖
* CWAC full: (‖UᵀΔW‖ + ‖ΔW V‖) / ‖W‖ with ΔW = W − W₀: relative to the weight, whose own rounding bounds what a
  bf16 weight can hold (early updates are below that resolution, so a ratio to ‖ΔW‖ says little there)
* GuardSpace: ‖A R‖ / ‖A‖ (R: the protected input directions)

Usage: ``python benchmarks/precision_leak.py [--steps 200] [--artifact DIR]`` (calibrates a tiny artifact when none is
given; ~1-2 min on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from peft import LoraConfig, get_peft_model

from safeguard_plugin.calibration import calibrate
from safeguard_plugin.constraints.cwac.calibrate import target_linears
from safeguard_plugin.data import load_prompts
from safeguard_plugin.engine import SafeguardEngine
from safeguard_plugin.modeling import is_lora_layer
from safeguard_plugin.testing import tiny_model, tiny_tokenizer

BF16_U = 2.0 ** -8  # bf16 unit roundoff
BOUND = {torch.float32: 1e-5, torch.bfloat16: 4 * BF16_U}  # the bound the table checks (docs/precision.md)
GUARDSPACE = {"null_energy": 0.05}


def batches(tok, n_rows: int = 32, batch_size: int = 8):
    rows = []
    for a in range(8):
        for b in range(n_rows // 8):
            msgs = [{"role": "user", "content": f"What is {a} plus {b}?"}]
            prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": f"{a} plus {b} is {a + b}."}],
                                           tokenize=False)
            p_ids, ids = (tok(t, add_special_tokens=False)["input_ids"] for t in (prompt, full))
            rows.append((ids, [-100] * len(p_ids) + ids[len(p_ids):]))
    out = []
    for s in range(0, len(rows), batch_size):
        chunk = rows[s: s + batch_size]
        n = max(len(r[0]) for r in chunk)
        out.append({"input_ids": torch.tensor([r[0] + [tok.pad_token_id] * (n - len(r[0])) for r in chunk]),
                    "attention_mask": torch.tensor([[1] * len(r[0]) + [0] * (n - len(r[0])) for r in chunk]),
                    "labels": torch.tensor([r[1] + [-100] * (n - len(r[1])) for r in chunk])})
    return out


def share(d: torch.Tensor, U, V, scale: float | None = None) -> float:
    tot = float(d.norm()) if scale is None else scale
    left = float((U.T @ d).norm()) if U is not None else 0.0
    right = float((d @ V).norm()) if V is not None else 0.0
    return (left + right) / tot if tot > 0 else 0.0


def build(method: str, mode: str, dtype: torch.dtype, art: str, tok):
    torch.manual_seed(0)
    model = tiny_model()
    if mode == "lora":
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                 target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]))
    cfg = {"artifact": art, "cwac": {"sae_weight": 0.0}} if method == "cwac" else {"artifact": art,
                                                                                    "guardspace": GUARDSPACE}
    engine = SafeguardEngine(cfg).setup(model, tok)
    model.to(dtype)  # every parameter (LoRA factors included) in the measured dtype
    for c in engine.constraints:  # CWAC's bases are float32 tensors of its own; GuardSpace's live on the modules
        if c.name == "guardspace":
            for layer in c.gs_layers.values():
                a = layer.lora_A[layer.gs_adapter]
                a.gs_basis = a.gs_basis.float() if a.gs_basis is not None else None
                a.gs_dense = a.gs_dense.float() if a.gs_dense is not None else None
    return model, engine


def naive_bf16_projection(engine) -> None:
    """The same projections in bf16 arithmetic with a bf16 basis (the comparison rows; not what the plugin does)."""
    with torch.no_grad():
        for c in engine.constraints:
            if c.name == "cwac":
                for item in c._plan:
                    U, V = (None if x is None else x.bfloat16() for x in (item["U"], item["V"]))
                    if item["kind"] == "lora":
                        B, A = item["B"], item["A"]
                        if U is not None:
                            B.copy_(B - U @ (U.T @ B))
                        if V is not None:
                            A.copy_(A - (A @ V) @ V.T)
                    else:
                        raise NotImplementedError("naive rows: LoRA only")
            else:
                for layer in c.gs_layers.values():
                    a = layer.lora_A[layer.gs_adapter]
                    R = a.gs_basis.bfloat16()
                    a.weight.copy_(a.weight - (a.weight @ R) @ R.T)


def leak(model, engine, w0) -> float:
    worst = 0.0
    for c in engine.constraints:
        if c.name == "cwac":
            for key, mod in target_linears(model).items():
                U, V = c.bases.get(key, (None, None))
                if U is None and V is None or not any(p.requires_grad for p in mod.parameters()):
                    continue
                if is_lora_layer(mod):
                    for ad in mod.lora_A:
                        worst = max(worst, share(mod.lora_B[ad].weight.float() @ mod.lora_A[ad].weight.float(), U, V))
                else:
                    W = mod.weight.float()
                    worst = max(worst, share(W - w0[key], U, V, float(W.norm())))
        else:
            for layer in c.gs_layers.values():
                a = layer.lora_A[layer.gs_adapter]
                A = a.weight.float()
                worst = max(worst, float((A @ a.gs_basis.float()).norm() / A.norm()))
    return worst


def run(method: str, mode: str, dtype: torch.dtype, naive: bool, art: str, tok, data, steps: int) -> dict:
    model, engine = build(method, mode, dtype, art, tok)
    engine.begin_training(max_steps=steps, grad_accum=1)
    w0 = {k: m.weight.detach().float().clone() for k, m in target_linears(model).items() if not is_lora_layer(m)}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    model.train()
    leaks = []
    for step in range(1, steps + 1):
        loss = model(**data[step % len(data)]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if naive:
            naive_bf16_projection(engine)
        else:
            engine.after_step(step)
        leaks.append(leak(model, engine, w0))
    return {"first": leaks[0], "max": max(leaks), "last": leaks[-1], "loss": float(loss.detach())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--artifact", help="an artifact of tiny_model() with cwac and guardspace (default: calibrate one)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tok = tiny_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        art = args.artifact
        if art is None:
            art = f"{tmp}/art"
            calibrate(tiny_model(), tok, load_prompts("harmful", limit=32), load_prompts("harmless", limit=32), art,
                      model_id="tiny", constraints=["cwac", "guardspace"], progress=False,
                      constraint_configs={"guardspace": GUARDSPACE})
        data = batches(tok)
        rows = [("cwac", "lora"), ("cwac", "full"), ("guardspace", "lora")]
        print(f"leak into the protected subspace over {args.steps} AdamW steps (lr 1e-3), tiny Qwen2 on CPU")
        print("| method | params | projection | leak step 1 | max leak | leak last step | bound | within |")
        print("|---|---|---|---|---|---|---|---|")
        for method, mode in rows:
            for dtype, naive in ((torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)):
                if naive and mode == "full":
                    continue
                t0 = time.time()
                r = run(method, mode, dtype, naive, art, tok, data, args.steps)
                bound = BOUND[dtype]
                how = "naive bf16 maths" if naive else "fp32, rounded once"
                name = {"cwac": "CWAC", "guardspace": "GuardSpace"}[method]
                print(f"| {name} {mode} | {str(dtype).replace('torch.', '')} | {how} | {r['first']:.2e} | "
                      f"{r['max']:.2e} | {r['last']:.2e} | {bound:.1e} | {'yes' if r['max'] <= bound else 'NO'} |"
                      f"  ({time.time() - t0:.0f}s, loss {r['loss']:.2f})", flush=True)


if __name__ == "__main__":
    main()
