"""CWAC: calibration (gradient / alignment subspaces, SAE in SAELens format), exact update projection under Adam
(LoRA and full fine-tuning), the SAE feature term, coupling, errors."""

import json

import pytest
import torch

from safeguard_plugin.artifacts import Artifact, ArtifactError
from safeguard_plugin.calibration import calibrate
from safeguard_plugin.constraints.cwac import CWAC, CWACConfig, CWACError, alignment_subspaces, target_linears
from safeguard_plugin.data import load_prompts
from safeguard_plugin.sae import SparseAutoencoder
from safeguard_plugin.testing import tiny_model

from helpers import max_diff, train


@pytest.fixture(scope="module")
def cw_art(tmp_path_factory, tok):
    out = tmp_path_factory.mktemp("cwac") / "art"
    calibrate(tiny_model(), tok, load_prompts("harmful", limit=48), load_prompts("harmless", limit=48), out,
              model_id="tiny", constraints=["cwac"], progress=False,
              constraint_configs={"cwac": CWACConfig(calibration={"sae_steps": 200, "max_rank": 8})})
    return out


def cfg(art, **cw):
    return {"artifact": str(art), "cwac": cw}


def _leak(U, V, dW):
    """Relative norm of ΔW's component in the subspace: (‖UᵀΔW‖ + ‖ΔW V‖) / ‖ΔW‖."""
    dW = dW.double()
    return float(((U.double().T @ dW).norm() + (dW @ V.double()).norm()) / dW.norm())


def test_calibration_writes_subspaces_and_an_sae_in_saelens_format(cw_art):
    art = Artifact.load(cw_art)
    tensors, meta = art.component("cwac_subspace")
    assert meta["sources"] == ["gradient"]
    lm = meta["gradient"]["layers"]["1.mlp.up_proj"]
    U, V = tensors["gradient.1.mlp.up_proj.U"], tensors["gradient.1.mlp.up_proj.V"]
    assert U.shape == (lm["d_out"], lm["rank_left"]) and V.shape == (lm["d_in"], lm["rank_right"])
    assert torch.allclose(U.T @ U, torch.eye(U.shape[1]), atol=1e-4)  # orthonormal bases
    assert 1 <= lm["rank_left"] <= 8 and 0 < lm["energy_left"] <= 1
    # the SAE folder is SAELens' format: cfg.json + sae_weights.safetensors with W_enc (d_in, d_sae) etc.
    _, smeta = art.component("cwac_sae")
    folder = cw_art / smeta["sae_dir"]
    cfgj = json.loads((folder / "cfg.json").read_text())
    assert cfgj["architecture"] == "topk" and cfgj["d_in"] == 64 and cfgj["d_sae"] == 4 * 64 and cfgj["k"] == 32
    assert cfgj["metadata"]["hook_name"] == f"blocks.{smeta['layer']}.hook_resid_post"
    from safetensors.torch import load_file

    w = load_file(str(folder / "sae_weights.safetensors"))
    assert {k: tuple(v.shape) for k, v in w.items()} == {"W_enc": (64, 256), "b_enc": (256,), "W_dec": (256, 64),
                                                          "b_dec": (64,)}
    assert 0.5 < smeta["explained_variance"] <= 1 and smeta["l0"] == pytest.approx(32, abs=1)
    sae = SparseAutoencoder.load(folder)
    x = torch.randn(3, 64)
    f = sae.encode(x)
    assert ((f > 0).sum(-1) <= 32).all() and torch.allclose(sae.encode(x, torch.tensor([3, 7])), f[:, [3, 7]])


def test_modified_sae_file_is_refused(cw_art, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(cw_art, bad)
    (bad / "sae" / "cfg.json").write_text("{}")
    with pytest.raises(ArtifactError, match="sha256"):
        Artifact.load(bad)


def test_gradient_subspace_matches_exact_per_example_gradients(tok):
    """The sketch's left/right subspaces equal the exact top eigenvectors of Σ G_i G_iᵀ / Σ G_iᵀ G_i."""
    from safeguard_plugin.constraints.cwac.calibrate import _refusal_batches, gradient_subspaces

    model = tiny_model()
    prompts = load_prompts("harmful", limit=12).train[:6]
    c = CWACConfig(rank=3, target_modules=["down_proj"], calibration={"max_rank": 3, "sketch_size": 64})
    tensors, _ = gradient_subspaces(model, tok, prompts, c, batch_size=3, progress=False)
    W = model.model.layers[1].mlp.down_proj.weight
    GG, GtG = 0, 0
    for ids, mask, labels in _refusal_batches(tok, prompts, 1):
        model.zero_grad()
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="sum").backward()
        G = W.grad.double()
        GG, GtG = GG + G @ G.T, GtG + G.T @ G
    for M, key in ((GG, "U"), (GtG, "V")):
        ev, vec = torch.linalg.eigh(M)
        exact = vec[:, -3:]
        got = tensors[f"gradient.1.mlp.down_proj.{key}"].double()
        cos = torch.linalg.svdvals(exact.T @ got)  # cosines of the principal angles
        assert cos.min() > 0.99, (key, cos)


def test_alignment_subspace_recovers_the_alignment_delta():
    base = tiny_model(seed=1)
    aligned = tiny_model(seed=1)
    g = torch.Generator().manual_seed(3)
    w = aligned.model.layers[2].self_attn.o_proj.weight
    Ut, _ = torch.linalg.qr(torch.randn(w.shape[0], 2, generator=g))
    Vt, _ = torch.linalg.qr(torch.randn(w.shape[1], 2, generator=g))
    with torch.no_grad():
        w += Ut @ torch.diag(torch.tensor([0.5, 0.3])) @ Vt.T
    tensors, meta = alignment_subspaces(aligned, base, CWACConfig(calibration={"energy": 0.99}))
    assert meta["layers"]["2.self_attn.o_proj"]["rank_left"] == 2
    assert meta["layers"]["0.self_attn.o_proj"]["unchanged_by_alignment"]
    U = tensors["alignment.2.self_attn.o_proj.U"]
    assert torch.linalg.svdvals(Ut.T @ U).min() > 0.999


@pytest.mark.parametrize("lora", [True, False])
def test_updates_stay_out_of_the_subspace_under_adam_and_plain_sft_does_not(cw_art, tok, chat_rows, tmp_path, lora):
    torch.manual_seed(0)
    w0 = {k: m.weight.detach().clone() for k, m in target_linears(tiny_model()).items()}
    cw_tr, cw = train("callback", chat_rows, tok, tmp_path / "c", cfg(cw_art, sae_weight=0.0), lora=lora)
    pl_tr, pl = train("plain", chat_rows, tok, tmp_path / "p", lora=lora)
    art = Artifact.load(cw_art)
    tensors, _ = art.component("cwac_subspace")
    checked = 0
    for key in w0:
        layer, name = key.split(".", 1)
        prefix = f"base_model.model.model.layers.{layer}.{name}" if lora else f"model.layers.{layer}.{name}"
        U, V = tensors[f"gradient.{key}.U"], tensors[f"gradient.{key}.V"]
        deltas = []
        for sd in (cw, pl):
            if lora:
                if f"{prefix}.lora_A.default.weight" not in sd:
                    continue
                deltas.append(sd[f"{prefix}.lora_B.default.weight"] @ sd[f"{prefix}.lora_A.default.weight"])
            else:
                deltas.append(sd[f"{prefix}.weight"] - w0[key])
        if not deltas:
            continue
        assert deltas[0].norm() > 0 and _leak(U, V, deltas[0]) < 1e-5, key
        assert _leak(U, V, deltas[1]) > 1e-2, key
        checked += 1
    assert checked == (12 if lora else 28)
    logs = [h for h in cw_tr.state.log_history if "safeguard/cwac_projected_matrices" in h]
    assert logs and logs[-1]["safeguard/cwac_projected_matrices"] == checked
    if lora:
        assert logs[-1]["safeguard/cwac_subspace_leak"] < 1e-5


def test_sae_term_is_zero_at_step0_and_changes_training(cw_art, tok, chat_rows, tmp_path):
    cw_tr, cw = train("callback", chat_rows, tok, tmp_path / "c", cfg(cw_art, projection=False, sae_weight=10.0))
    _, pl = train("plain", chat_rows, tok, tmp_path / "p")
    pen = [h["safeguard/cwac_sae_loss"] for h in cw_tr.state.log_history if "safeguard/cwac_sae_loss" in h]
    assert len(pen) == 4 and pen[0] == pytest.approx(0.0, abs=1e-8) and max(pen) > 1e-6
    assert max_diff(cw, pl) > 1e-4


def test_coupled_callback_equals_mixin_and_each_part_matters(cw_art, tok, chat_rows, tmp_path):
    c = cfg(cw_art, sae_weight=10.0)
    _, cb = train("callback", chat_rows, tok, tmp_path / "c", c, lora=True)
    _, mx = train("mixin", chat_rows, tok, tmp_path / "m", c, lora=True)
    assert max_diff(cb, mx) < 1e-6
    _, w_only = train("callback", chat_rows, tok, tmp_path / "w", cfg(cw_art, sae_weight=0.0), lora=True)
    _, s_only = train("callback", chat_rows, tok, tmp_path / "s", cfg(cw_art, projection=False, sae_weight=10.0),
                      lora=True)
    assert max_diff(cb, w_only) > 1e-5 and max_diff(cb, s_only) > 1e-5


def test_full_ft_anchors_survive_a_checkpoint(cw_art, tok, tmp_path):
    from safeguard_plugin.engine import SafeguardEngine

    model = tiny_model()
    eng = SafeguardEngine(cfg(cw_art, sae_weight=0.0)).setup(model, tok)
    eng.begin_training(max_steps=4, grad_accum=1)
    eng.save_state(tmp_path)
    with torch.no_grad():  # weights move (as after some steps); anchors must still describe W₀
        model.model.layers[1].mlp.up_proj.weight.add_(1.0)
    eng2 = SafeguardEngine(cfg(cw_art, sae_weight=0.0)).setup(model, tok)
    eng2.begin_training(max_steps=4, grad_accum=1)
    assert eng2.load_state(tmp_path)
    a = eng.constraints[0]._anchors["1.mlp.up_proj"][0]
    assert torch.equal(eng2.constraints[0]._anchors["1.mlp.up_proj"][0], a)


def test_bad_configs_fail_with_the_fix(cw_art, tok, artifact_dir):
    art = Artifact.load(cw_art)
    with pytest.raises(CWACError, match="both parts are off"):
        CWAC(CWACConfig(projection=False, sae_weight=0.0), art)
    with pytest.raises(CWACError, match="base-model"):
        CWAC(CWACConfig(subspace="alignment"), art)
    with pytest.raises(CWACError, match="covers none"):
        CWAC(CWACConfig(target_modules=["nope_proj"]), art)
    with pytest.raises(CWACError, match="n_features"):
        CWAC(CWACConfig(n_features=999), art)
    from safeguard_plugin.engine import SafeguardEngine

    with pytest.raises(ArtifactError):  # an artifact for another model
        SafeguardEngine(cfg(cw_art)).setup(tiny_model(hidden=32), tok)
    with pytest.raises(CWACError, match="hidden size"):
        c = CWAC(CWACConfig(), art)
        c.validate_model(tiny_model(hidden=32))


def test_lora_outside_the_calibrated_modules_fails(tok, tmp_path, chat_rows):
    out = tmp_path / "qonly"
    calibrate(tiny_model(), tok, load_prompts("harmful", limit=24), load_prompts("harmless", limit=24), out,
              model_id="tiny", constraints=["cwac"], progress=False,
              constraint_configs={"cwac": CWACConfig(target_modules=["k_proj"],
                                                     calibration={"sae_steps": 20, "max_rank": 4})})
    with pytest.raises(Exception, match="none of the model's trainable linear layers"):
        train("callback", chat_rows, tok, tmp_path / "t", cfg(out, sae_weight=0.0), lora=True)


def test_benchmark_rows_and_registry():
    from safeguard_plugin.registry import available_constraints

    assert available_constraints()["cwac"] is CWAC
    from safeguard_plugin.bench.runner import method_bench

    assert set(method_bench(CWAC).rows) == {"cwac_weight", "cwac_sae", "cwac"}


def test_projection_refuses_adapters_with_a_nonzero_initial_update(cw_art, tok):
    from peft import LoraConfig, get_peft_model

    from safeguard_plugin.engine import SafeguardEngine

    model = get_peft_model(tiny_model(), LoraConfig(r=4, target_modules=["up_proj"], lora_dropout=0.0))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    eng = SafeguardEngine(cfg(cw_art, sae_weight=0.0)).setup(model, tok)
    with pytest.raises(CWACError, match="non-zero update"):
        eng.begin_training(max_steps=2, grad_accum=1)


def test_feature_scale_is_one_per_feature(cw_art):
    """A feature silent at some post-instruction position must not get a ~0 scale there (z would explode)."""
    art = Artifact.load(cw_art)
    raw = art.component("cwac_sae")[0]["std"]
    c = CWAC(CWACConfig(), art)
    assert torch.equal(c.std, c.std[:1].expand_as(c.std)) and float(c.std.min()) >= 1e-3
    assert torch.allclose(c.std[0], raw.pow(2).mean(0).sqrt().clamp(min=1e-3))
