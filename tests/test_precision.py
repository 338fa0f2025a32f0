"""Mixed precision as users train: {fp32, bf16 autocast, bf16 weights, fp16 autocast + GradScaler} × {LoRA, full} ×
every constraint (and all combined), one training step each on a tiny Qwen2 on CPU.

Each cell runs what a trainer runs (the engine in ``inject`` mode, the loss scaled by a ``torch.amp.GradScaler`` for
fp16, the scaler's scale given to the engine the way the TRL callback gives it) and checks:

* no NaN/inf in the gradients, the weights after the step, or the logged metrics; the constraint's metrics are logged;
* the gradients match the fp32 cell within ``GRAD_TOL`` (relative L2 error over all trainable parameters);
* the penalty is active: it changes the gradients (vs plain SFT at the same precision) by the same amount as in fp32,
  within ``EFFECT_TOL`` — without the fp16 loss scale on the injected gradient this is off by ~100% (tested);
* post-step projections hold: CWAC's / GuardSpace's leak into the protected subspace after the step stays under
  ``LEAK_BOUND`` (fp32 parameters: float rounding; bf16 parameters: one bf16 rounding), while the unprojected update
  leaks far more.

Before the measured step the decoder weights are perturbed (after the reference values were cached), so the
penalties that are zero at step 0 (ProCon, the SAE term) have a gradient. A mismatch fails with the observed error.
The TRL tests at the end run the same through ``SFTTrainer`` (``SFTConfig(bf16=True)``, a bf16-loaded model, fp16
with accelerate's scaler).

Every precision with all constraints combined (LoRA and full) and one TRL run each, and the rest of the matrix (each
constraint alone, marked ``precision``: ``python -m pytest tests/test_precision.py -m precision`` selects it), all run
in the default suite.
"""

from __future__ import annotations

import contextlib
import functools
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

from safeguard_plugin.engine import SafeguardEngine
from safeguard_plugin.modeling import find_decoder_layers, is_lora_layer
from safeguard_plugin.precision import grad_scaler_scale
from safeguard_plugin.testing import tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")

PRECISIONS = ["fp32", "bf16_autocast", "bf16_weights", "fp16_scaler"]
# relative L2 error vs fp32 of the gradients and of the penalty's effect on them. Observed maxima over the matrix
# (docs/precision.md): gradients 0.067 / 0.111 / 0.012, effect 0.053 / 0.099 / 0.017 (bf16 autocast / bf16 weights /
# fp16); the tolerances leave ~2x headroom. bf16 keeps 8 significant bits, so differences of activations (ProCon's
# drift, the SAE features' change) carry a few % error whatever the penalty computes in fp32.
GRAD_TOL = {"fp32": 0.0, "bf16_autocast": 0.15, "bf16_weights": 0.25, "fp16_scaler": 0.03}
EFFECT_TOL = {"fp32": 0.0, "bf16_autocast": 0.12, "bf16_weights": 0.2, "fp16_scaler": 0.04}
# leak into the protected subspace after a projected step, by the dtype of the projected parameters: float32
# rounding; bf16: the projection is done in float32 and rounded once, so a few bf16 unit roundoffs (2^-8 each)
LEAK_BOUND = {torch.float32: 1e-5, torch.bfloat16: 2.0 ** -6}
FP16_INIT_SCALE = 2.0 ** 16  # torch's and accelerate's default
MAX_SKIPPED = 8
FP16_SMALL_SCALE = 2.0 ** 6
LR = 1e-2

PROCON_WEIGHT, SAE_WEIGHT = 0.05, 0.001  # the penalty and the CE gradient of similar size after the perturbation
MONITOR = {"every_n_steps": 1, "n_prompts": 4}
# the shared artifact (hidden 64) keeps 2 null-space dims per layer at the default null_energy; 0.05 keeps more
GUARDSPACE = {"null_energy": 0.05}
ANCHOR = {"weight": 100.0, "pool_size": 8, "tokens": 4, "batch_size": 2}
CONSTRAINTS = {
    "procon": {"procon": {"weight": PROCON_WEIGHT, "warmup_ratio": 0.0}},
    "cwac": {"cwac": {"sae_weight": SAE_WEIGHT}},
    "adaptive_kl_live": {"adaptive_kl": {"risk": "probe", "reference": "live"}},
    "adaptive_kl_precomputed": {"adaptive_kl": {"risk": "probe", "reference": "precomputed"}},
    "guardspace": {"guardspace": GUARDSPACE},
    "monitor": {"monitor": MONITOR},
    "anchor": {"anchor": ANCHOR},
    "all": {"procon": {"weight": PROCON_WEIGHT, "warmup_ratio": 0.0}, "cwac": {"sae_weight": SAE_WEIGHT},
            "adaptive_kl": {"risk": "probe"}, "monitor": MONITOR, "anchor": ANCHOR},
}
# metrics each constraint logs (one per constraint is enough to show it ran and reported)
METRICS = {"procon": ["safeguard/procon_loss"], "cwac": ["safeguard/cwac_sae_loss", "safeguard/cwac_projected_matrices"],
           "adaptive_kl_live": ["safeguard/akl_ce"], "adaptive_kl_precomputed": ["safeguard/akl_kl"],
           "guardspace": ["safeguard/guardspace_update_norm"], "monitor": ["safeguard/monitor_alerts"],
           "anchor": ["safeguard/anchor_kl"]}
METRICS["all"] = METRICS["procon"] + ["safeguard/cwac_sae_loss", "safeguard/akl_ce"] + METRICS["monitor"] \
    + METRICS["anchor"]
# a penalty strong enough that its scaled fp16 gradient overflows at the default scale
OVERFLOW = {"procon": {"weight": 20.0, "warmup_ratio": 0.0}}
LORA_ONLY = {"guardspace": "GuardSpace trains LoRA adapters only (requires_lora_adapter)",
             "adaptive_kl_live": "the live reference is the adapter-disabled model: LoRA only"}


def _autocast(precision: str):
    dtype = {"bf16_autocast": torch.bfloat16, "fp16_scaler": torch.float16}.get(precision)
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _model(precision: str, mode: str, cfg: dict | None):
    torch.manual_seed(0)
    model = tiny_model()
    if precision == "bf16_weights":
        model = model.to(torch.bfloat16)  # a model loaded with torch_dtype=bfloat16
    if mode == "lora":
        torch.manual_seed(1)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                 target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]))
    return model


def _perturb(model) -> None:
    """Move every decoder weight by ~10% (same noise at every precision), after the references were cached."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in find_decoder_layers(model).named_parameters():
            if p.ndim == 2 and "lora_" not in name:
                noise = torch.randn(p.shape, generator=gen) * float(p.float().std()) * 0.1
                p.copy_((p.float() + noise).to(p.dtype))


def _batch(tok, rows):
    seqs, labels = [], []
    for r in rows:
        prompt = tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(r["prompt"] + r["completion"], tokenize=False)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        ids = tok(full, add_special_tokens=False)["input_ids"]
        seqs.append(ids)
        labels.append([-100] * len(p_ids) + ids[len(p_ids):])
    n = max(map(len, seqs))
    pad = tok.pad_token_id
    return {"input_ids": torch.tensor([s + [pad] * (n - len(s)) for s in seqs]),
            "attention_mask": torch.tensor([[1] * len(s) + [0] * (n - len(s)) for s in seqs]),
            "labels": torch.tensor([lab + [-100] * (n - len(lab)) for lab in labels])}


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def _flat(d: dict[str, torch.Tensor], keys) -> torch.Tensor:
    return torch.cat([d[k].reshape(-1) for k in keys])


def _unit_roundoff(t: torch.Tensor) -> float:
    return torch.finfo(t.dtype).eps / 2


def _leak(model, engine, w0: dict[str, torch.Tensor]) -> tuple[float, float, float]:
    """``(leak after the projection, leak of the unprojected SGD step, bound)``, the largest over the projected
    matrices. LoRA: CWAC's ``(‖UᵀΔW‖ + ‖ΔW V‖) / ‖ΔW‖`` with ΔW = BA (its ``cwac_subspace_leak``), GuardSpace
    ``‖A R‖ / ‖A‖``. Full fine-tuning: ``(‖UᵀΔW‖ + ‖ΔW V‖) / ‖W‖``, relative to the weight, since a one-step ΔW can be
    below the weight's own rounding. Bound: ``LEAK_BOUND`` of the projected parameters' dtype."""
    from safeguard_plugin.constraints.cwac.calibrate import target_linears

    after = before = bound = 0.0
    for c in engine.constraints:
        if c.name == "cwac" and c.bases:
            for key, mod in target_linears(model).items():
                U, V = c.bases.get(key, (None, None))
                if U is None and V is None:
                    continue
                if is_lora_layer(mod):
                    for a in mod.lora_A:
                        A, B = mod.lora_A[a].weight, mod.lora_B[a].weight
                        raw = (B.float() - LR * B.grad.float()) @ (A.float() - LR * A.grad.float())
                        after = max(after, _subspace_share(B.float() @ A.float(), U, V))
                        before = max(before, _subspace_share(raw, U, V))
                        bound = max(bound, LEAK_BOUND[B.dtype])
                elif mod.weight.grad is not None:  # frozen: a LoRA run's unadapted layers
                    W = mod.weight
                    scale = float(W.float().norm())
                    after = max(after, _subspace_share(W.float() - w0[key], U, V, scale))
                    before = max(before, _subspace_share(-LR * W.grad.float(), U, V, scale))
                    bound = max(bound, LEAK_BOUND[W.dtype])
        if c.name == "guardspace":
            for layer in c.gs_layers.values():
                a = layer.lora_A[layer.gs_adapter]
                R, A = a.gs_basis.float(), a.weight.float()
                raw = A - LR * a.weight.grad.float()
                after = max(after, float((A @ R).norm() / A.norm()))
                before = max(before, float((raw @ R).norm() / raw.norm()))
                bound = max(bound, LEAK_BOUND[a.weight.dtype])
    return after, before, bound


def _subspace_share(d: torch.Tensor, U, V, scale: float | None = None) -> float:
    tot = float(d.detach().norm()) if scale is None else scale
    if tot == 0:
        return 0.0
    left = float((U.T @ d).norm()) if U is not None else 0.0
    right = float((d @ V).norm()) if V is not None else 0.0
    return (left + right) / tot


class Cells:
    """The one-step runs, each made once and shared by the tests that compare against it."""

    def __init__(self, tok, rows, art: str):
        self.tok, self.rows, self.art = tok, rows, art

    @functools.cache  # noqa: B019 -- one instance per module (fixture), kept for its runs
    def get(self, precision: str, mode: str, name: str | None, loss_scale: bool = True) -> dict:
        return _run_cell(precision, mode, name, self.tok, self.rows, self.art, loss_scale)


def _run_cell(precision: str, mode: str, name: str | None, tok, rows, art: str, loss_scale: bool = True) -> dict:
    """One training step: unscaled fp32 gradients, finiteness, metrics, and the projection leaks. ``loss_scale``
    False: the engine is not told the scaler's scale (what the plugin did before fp16 was supported)."""
    cfg = {"artifact": art, **(OVERFLOW if name == "overflow" else CONSTRAINTS[name])} if name else {}
    if name == "all" and mode == "lora":  # CWAC's projection refuses GuardSpace's non-zero initial adapters: SAE term
        cfg = {**cfg, "guardspace": GUARDSPACE, "cwac": {"projection": False, "sae_weight": SAE_WEIGHT}}
    model = _model(precision, mode, cfg)
    engine = SafeguardEngine(cfg, mode="inject").setup(model, tok) if cfg else None
    batch = _batch(tok, rows)
    scaler = torch.amp.GradScaler("cpu", init_scale=FP16_INIT_SCALE, enabled=precision == "fp16_scaler")
    if engine is not None:
        if loss_scale:  # what the TRL callback does with the trainer's scaler
            engine.set_loss_scale(lambda: grad_scaler_scale(scaler))
        with _autocast(precision):
            engine.precompute_references([batch], progress=False)
    _perturb(model)
    if engine is not None:  # after the perturbation: CWAC anchors the weights the step starts from
        engine.begin_training(max_steps=10, grad_accum=1)
    params = _trainable(model)
    w0 = {}
    if engine is not None and any(c.name == "cwac" for c in engine.constraints):
        from safeguard_plugin.constraints.cwac.calibrate import target_linears

        w0 = {k: m.weight.detach().float().clone() for k, m in target_linears(model).items() if not is_lora_layer(m)}
    opt = torch.optim.SGD(params.values(), lr=LR)
    model.train()
    before = {n: p.detach().clone() for n, p in params.items()}
    skipped = 0
    while True:  # fp16: a step whose scaled gradients overflow is skipped and the scale halved, as in the trainer
        opt.zero_grad(set_to_none=True)
        with _autocast(precision):
            loss = model(**batch).loss
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        grads = {n: p.grad.detach().float().clone() for n, p in params.items()}
        finite = all(bool(torch.isfinite(g).all()) for g in grads.values())
        scaler.step(opt)
        scaler.update()
        if finite or skipped == MAX_SKIPPED:
            break
        skipped += 1
        assert all(torch.equal(p, before[n]) for n, p in params.items()), "an overflowing fp16 step changed weights"
    out = {"grads": grads, "loss": float(loss.detach()), "metrics": {}, "leak": None, "leak_before": None,
           "skipped": skipped, "weights_finite": all(bool(torch.isfinite(p).all()) for p in params.values())}
    if engine is not None:
        engine.after_step(1)
        out["metrics"] = engine.metrics()
        if any(c.name in ("cwac", "guardspace") for c in engine.constraints):
            out["leak"], out["leak_before"], out["leak_bound"] = _leak(model, engine, w0)
        out["backward_seen"] = engine._backward_seen
        engine.detach()
    return out


@pytest.fixture(scope="module")
def cells(tok, chat_rows, artifact_dir):
    return Cells(tok, chat_rows[:4], str(artifact_dir))


def _cases():
    for precision in PRECISIONS:
        for mode in ("lora", "full"):
            for name in CONSTRAINTS:
                marks = [] if name == "all" else [pytest.mark.precision]  # default suite: all combined, per precision
                if mode == "full" and name in LORA_ONLY:
                    marks.append(pytest.mark.skip(reason=LORA_ONLY[name]))
                yield pytest.param(precision, mode, name, marks=marks, id=f"{precision}-{mode}-{name}")


@pytest.mark.parametrize("precision,mode,name", list(_cases()))
def test_precision_matrix(cells, precision, mode, name):
    ref, cell = cells.get("fp32", mode, name), cells.get(precision, mode, name)
    keys = sorted(ref["grads"])
    where = f"{precision}/{mode}/{name}"
    g, g32 = _flat(cell["grads"], keys), _flat(ref["grads"], keys)
    assert bool(torch.isfinite(g).all()) and cell["weights_finite"], f"{where}: non-finite gradients or weights"
    bad = {k: v for k, v in cell["metrics"].items() if not math.isfinite(v)}
    assert not bad, f"{where}: non-finite metrics {bad}"
    missing = [m for m in METRICS[name] if m not in cell["metrics"]]
    assert not missing, f"{where}: metrics {missing} not logged (got {sorted(cell['metrics'])})"
    err = _rel(g, g32)
    assert err <= GRAD_TOL[precision], f"{where}: gradients differ from fp32 by {err:.3g} (tolerance {GRAD_TOL[precision]})"
    if name in ("guardspace", "monitor"):
        pass  # GuardSpace re-initialises the adapters (no plain-SFT gradient to compare); the monitor only measures
    else:
        plain, plain32 = cells.get(precision, mode, None), cells.get("fp32", mode, None)
        effect = g - _flat(plain["grads"], keys)
        effect32 = g32 - _flat(plain32["grads"], keys)
        share = float(effect32.norm() / g32.norm())
        assert share > 0.05, f"{where}: the penalty changes the fp32 gradient by only {share:.3g} (inactive?)"
        e_err = _rel(effect, effect32)
        assert e_err <= EFFECT_TOL[precision], (f"{where}: the penalty's effect on the gradients differs from fp32 by "
                                                f"{e_err:.3g} (tolerance {EFFECT_TOL[precision]})")
    if cell["leak"] is not None:
        leak, before, bound = cell["leak"], cell["leak_before"], cell["leak_bound"]
        assert leak <= bound, f"{where}: leak into the protected subspace {leak:.3g} > {bound:.3g}"
        assert before > 10 * leak, f"{where}: the unprojected step leaks {before:.3g}, the projected one {leak:.3g}"


@pytest.mark.parametrize("mode", ["lora", pytest.param("full", marks=pytest.mark.precision)])
def test_fp16_penalty_gradient_needs_the_loss_scale(cells, mode):
    """Without the scaler's scale on the injected gradient the penalty is ~65536x weaker after unscaling (what the
    plugin did before fp16 was supported): its effect on the gradients is then ~100% off."""
    keys = sorted(cells.get("fp32", mode, "procon")["grads"])
    effect32 = (_flat(cells.get("fp32", mode, "procon")["grads"], keys)
                - _flat(cells.get("fp32", mode, None)["grads"], keys))
    unscaled = cells.get("fp16_scaler", mode, "procon", loss_scale=False)
    effect = _flat(unscaled["grads"], keys) - _flat(cells.get("fp16_scaler", mode, None)["grads"], keys)
    assert _rel(effect, effect32) > 0.99


def test_fp16_overflowing_steps_are_skipped(cells):
    """A penalty whose scaled gradient overflows fp16: the scaler skips the step (weights unchanged, asserted in the
    run) and halves the scale, then the step goes through with the penalty intact (as in fp32)."""
    cell, ref = cells.get("fp16_scaler", "lora", "overflow"), cells.get("fp32", "lora", "overflow")
    assert 1 <= cell["skipped"] < MAX_SKIPPED
    keys = sorted(ref["grads"])
    err = _rel(_flat(cell["grads"], keys), _flat(ref["grads"], keys))
    assert err <= GRAD_TOL["fp16_scaler"], f"after the skipped steps the gradients differ from fp32 by {err:.3g}"
    assert cell["weights_finite"] and cell["metrics"]["safeguard/nan_skipped"] == 0


# ------------------------------------------------------------------------------------------ through TRL's SFTTrainer
def _sft(rows, tok, out, cfg, *, lora: bool, kind: str = "callback", bf16_model: bool = False, fp16: bool = False,
         init_scale: float = FP16_INIT_SCALE, **kw):
    """A 3-step SFTTrainer run. ``fp16``: SFTConfig(fp16=True) with accelerate's GradScaler and fp16 autocast, which
    accelerate sets up on GPUs only; on CPU the test installs them the way accelerate does (torch 2.13 runs both)."""
    from datasets import Dataset
    from trl import SFTTrainer

    from safeguard_plugin.integrations.trl import SafeguardCallback, SafeguardSFTTrainer

    from helpers import sft_args

    torch.manual_seed(0)
    model = tiny_model().to(torch.bfloat16) if bf16_model else tiny_model()
    peft = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                      lora_dropout=0.0, task_type="CAUSAL_LM") if lora else None
    args = sft_args(out, max_steps=3, fp16=fp16, **kw)
    common = dict(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok, peft_config=peft)
    if kind == "mixin":
        tr = SafeguardSFTTrainer(**common, safeguard=cfg)
    else:
        tr = SFTTrainer(**common, callbacks=[SafeguardCallback(cfg)] if cfg else None)
    if fp16:
        tr.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
        tr.accelerator.native_amp = True  # the model's forward runs under fp16 autocast (wrapped in train())
    tr.train()
    return tr, {k: v.detach().float().clone() for k, v in tr.model.state_dict().items()}


@pytest.mark.parametrize("lora,bf16_model", [
    pytest.param(True, True, id="bf16-model-lora"),
    pytest.param(False, True, id="bf16-model-full", marks=pytest.mark.precision),
    pytest.param(True, False, id="fp32-model-lora", marks=pytest.mark.precision),
    pytest.param(False, False, id="fp32-model-full", marks=pytest.mark.precision)])
def test_trl_bf16_trains_every_constraint(artifact_dir, tok, chat_rows, tmp_path, lora, bf16_model):
    """SFTConfig(bf16=True) with every constraint at once, the model loaded in fp32 (autocast) or in bf16."""
    cfg = {"artifact": str(artifact_dir), **CONSTRAINTS["all"]}
    if lora:
        cfg.update(guardspace=GUARDSPACE, cwac={"projection": False, "sae_weight": SAE_WEIGHT})
    tr, weights = _sft(chat_rows, tok, tmp_path, cfg, lora=lora, bf16_model=bf16_model, bf16=True)
    # the live KL reference forward runs inside the autocast-wrapped training forward; autocast must be off after it
    assert not torch.is_autocast_enabled("cpu")
    assert all(bool(torch.isfinite(w).all()) for w in weights.values())
    logged = {k: v for h in tr.state.log_history for k, v in h.items() if k.startswith("safeguard/")}
    want = METRICS["all"] + (["safeguard/guardspace_update_norm"] if lora else ["safeguard/cwac_projected_matrices"])
    assert not [m for m in want if m not in logged], sorted(logged)
    assert all(math.isfinite(v) for v in logged.values()), logged
    assert logged["safeguard/nan_skipped"] == 0


@pytest.mark.parametrize("lora", [True, pytest.param(False, marks=pytest.mark.precision)], ids=["lora", "full"])
def test_trl_fp16_callback_gets_the_loss_scale(artifact_dir, tok, chat_rows, tmp_path, lora, monkeypatch):
    """SFTConfig(fp16=True): the callback's injected penalty gradient carries the scaler's scale, so it trains like
    the mixin (whose penalty is part of the scaled loss) and like fp32; without the scale it does not."""
    cfg = {"artifact": str(artifact_dir), "procon": {"weight": PROCON_WEIGHT, "warmup_ratio": 0.0}}
    # a scale at which no step overflows (a skipped step would make the comparison with fp32 meaningless); overflowing
    # steps: test_fp16_overflowing_steps_are_skipped
    run = functools.partial(_sft, chat_rows, tok, cfg=cfg, lora=lora, init_scale=FP16_SMALL_SCALE)
    _, fp32 = run(tmp_path / "fp32")
    _, plain = _sft(chat_rows, tok, tmp_path / "plain", None, lora=lora)
    _, plain16 = _sft(chat_rows, tok, tmp_path / "plain16", None, lora=lora, fp16=True, init_scale=FP16_SMALL_SCALE)
    cb_tr, cb = run(tmp_path / "cb", fp16=True)
    _, mixin = run(tmp_path / "mixin", fp16=True, kind="mixin")
    keys = sorted(k for k in fp32 if not torch.equal(fp32[k], plain[k]))  # the weights the penalty moved
    assert keys and cb_tr.accelerator.scaler.get_scale() == FP16_SMALL_SCALE  # no step skipped
    effect32 = _flat(fp32, keys) - _flat(plain, keys)
    err_mixin = _rel(_flat(cb, keys), _flat(mixin, keys))
    err_fp32 = _rel(_flat(cb, keys) - _flat(plain16, keys), effect32)
    assert err_mixin < 1e-3, f"fp16 callback vs mixin: weights differ by {err_mixin:.3g}"
    assert err_fp32 < EFFECT_TOL["fp16_scaler"], (f"fp16 callback vs fp32: the penalty's effect on the weights differs "
                                                  f"by {err_fp32:.3g} (tolerance {EFFECT_TOL['fp16_scaler']})")
    monkeypatch.setattr("safeguard_plugin.integrations.trl.trainer_loss_scale", lambda trainer: 1.0)
    _, unscaled = run(tmp_path / "unscaled", fp16=True)
    err = _rel(_flat(unscaled, keys), _flat(mixin, keys))
    assert err > 10 * 1e-3, f"without the loss scale the callback still matches the mixin ({err:.3g})"
