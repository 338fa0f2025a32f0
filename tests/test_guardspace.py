"""GuardSpace: calibration statistics, exact step-0 surgery through PEFT, null-space protection vs plain LoRA,
save/reload/export/merge with the projector, loud null-space failures, and the TRL callback path."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, inject_adapter_in_model

import safeguard_plugin.constraints.guardspace.calibrate as gsm
from safeguard_plugin.constraints.guardspace import (
    GuardSpace,
    GuardSpaceConfig,
    GuardSpaceError,
    NullSpaceLoraA,
    calibrate_guardspace,
    guardspace_layers,
    load_guardspace,
    merge_guardspace,
    prepare_guardspace_model,
    save_guardspace,
)
from safeguard_plugin.data import load_prompts
from safeguard_plugin.modeling import pad_right, tokenize_prompts
from safeguard_plugin.testing import tiny_model

HIDDEN, RANK = 256, 4  # hidden > calibration tokens' spread: harmful inputs occupy part of the space, as in LLMs
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def model():
    return tiny_model(hidden=HIDDEN)


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def gs_art(tmp_path_factory, tok, harmful):
    out = tmp_path_factory.mktemp("gs") / "art"
    art = calibrate_guardspace(model(), tok, harmful,
                               config={"null_energy": 0.01, "calibration": {"calibration_rank": 8}},
                               out_dir=out, model_id="tiny256", progress=False)
    return art, out


@pytest.fixture(scope="module")
def batch(tok, harmful):
    ids, mask = pad_right(tokenize_prompts(tok, harmful), tok.pad_token_id)
    return ids, mask


def logits(m, batch):
    m.eval()
    with torch.no_grad():
        return m(input_ids=batch[0], attention_mask=batch[1]).logits[batch[1].bool()]


def train_steps(m, steps=12, lr=1e-3, seed=1):
    """Adam on random token sequences (a fixed set of 16, so there is something to learn)."""
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(3, 1024, (16, 32), generator=g)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    m.train()
    losses = []
    for s in range(steps):
        x = data[(s % 2) * 8:(s % 2) * 8 + 8]
        loss = m(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def test_calibration_component_and_statistics(gs_art):
    art, out = gs_art
    from safeguard_plugin.artifacts import Artifact

    loaded = Artifact.load(out)
    tensors, meta = loaded.component("guardspace")
    assert meta["n_modules"] == 4 * 7 and set(meta["targets"]) == {f"{p}.{n}" for p, ns in
                                                                   (("self_attn", ALL7[:4]), ("mlp", ALL7[4:]))
                                                                   for n in ns}
    lm = meta["layers"]["0.self_attn.q_proj"]
    assert {"null_dim", "null_fraction", "null_energy", "stored_rank", "adapter_energy", "damping"} <= set(lm)
    assert lm["stored_rank"] == 8 and 0 < lm["null_dim"] < HIDDEN and lm["null_energy"] <= 0.01 + 1e-9
    # q/k/v (and gate/up) read the same tensor: one covariance, one projector
    assert meta["layers"]["0.self_attn.k_proj"]["group"] == lm["group"] != meta["layers"]["0.self_attn.o_proj"]["group"]
    R = tensors[f"group{lm['group']}.range"]
    assert R.shape == (HIDDEN, HIDDEN - lm["null_dim"])
    assert torch.allclose(R.T @ R, torch.eye(R.shape[1]), atol=1e-4)
    U, S, V = (tensors[f"0.self_attn.q_proj.{k}"] for k in "USV")
    assert U.shape == (HIDDEN, 8) and S.shape == (8,) and V.shape == (HIDDEN, 8)
    assert bool((S[:-1] >= S[1:]).all())  # PEFT CorDA order: descending, the smallest components last
    print("null-space dims:", {k: v["null_dim"] for k, v in meta["layers"].items()})


def test_calibration_for_all_constraints_includes_guardspace(artifact_dir):
    """Calibrating for every registered constraint adds the component with per-layer statistics."""
    from safeguard_plugin.artifacts import Artifact

    _, meta = Artifact.load(artifact_dir).component("guardspace")
    assert meta["n_modules"] == 4 * 7 and meta["null_energy_threshold"] == 0.01
    assert all(0 < m["null_dim"] < m["d_in"] and 0 < m["adapter_energy"] < 1 for m in meta["layers"].values())


def test_decompositions_match_reference(monkeypatch):
    g = torch.Generator().manual_seed(0)
    M = torch.randn(40, 70, generator=g, dtype=torch.float64)
    U, S, Vh, _ = gsm._smallest_components(M, 5)
    _, s_ref, _ = torch.linalg.svd(M, full_matrices=False)
    assert torch.allclose(S, s_ref[-5:], rtol=1e-8)
    assert torch.allclose(U @ torch.diag(S) @ Vh, M @ Vh.T @ Vh, atol=1e-8)  # same subspace and values
    # randomized range finder (used above EXACT_EIGH_MAX) keeps the exact energy criterion
    X = torch.randn(400, 200, generator=g, dtype=torch.float64) * torch.logspace(0, -3, 200, dtype=torch.float64)
    C = X.T @ X / 400
    R_exact, ev_exact, tr, _ = gsm._range_basis(C, 0.01)
    monkeypatch.setattr(gsm, "EXACT_EIGH_MAX", 64)
    R, ev, tr2, _ = gsm._range_basis(C, 0.01)
    assert tr == pytest.approx(tr2)
    left = 1 - float(torch.trace(R.T @ C @ R)) / tr
    assert left <= 0.01 and R.shape[1] <= R_exact.shape[1] + 8


def test_surgery_is_exact_at_step0_and_only_adapters_train(gs_art, batch):
    art, _ = gs_art
    m = model()
    ref = logits(m, batch)
    w0 = m.model.layers[0].self_attn.q_proj.weight.detach().clone()
    same = prepare_guardspace_model(m, art, rank=RANK)
    assert same is m
    assert (logits(m, batch) - ref).abs().max() < 1e-4
    layers = guardspace_layers(m)
    assert len(layers) == 28 and all(isinstance(la.lora_A["default"], NullSpaceLoraA) for la in layers.values())
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    q = m.model.layers[0].self_attn.q_proj
    assert not torch.equal(q.base_layer.weight, w0)  # residual weights W_res = W − s·B₀A₀P
    a = q.lora_A["default"]
    P = torch.eye(HIDDEN) - a.gs_basis @ a.gs_basis.T
    assert torch.allclose(a.projected_weight(), a.weight @ P, atol=1e-5)
    # disabling the adapter gives back the original layer (engine reference values)
    x = torch.randn(3, HIDDEN)
    q.enable_adapters(False)
    assert torch.allclose(q(x), x @ w0.T + q.base_layer.bias, atol=1e-5)
    q.enable_adapters(True)


def test_harmful_outputs_move_much_less_than_plain_lora(gs_art, batch):
    """Same rank, targets, optimizer, lr and data: the change of the logits on the harmful calibration prompts,
    raw and per unit of change on the training data (GuardSpace's CorDA init learns faster at the same lr)."""
    art, _ = gs_art
    base = model()
    ref = logits(base, batch)
    data = torch.randint(3, 1024, (16, 32), generator=torch.Generator().manual_seed(1))
    ref_train = logits(base, (data, torch.ones_like(data)))
    res = {}
    for kind in ("lora", "guardspace", "guardspace_step"):
        m = model()
        if kind == "lora":
            inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=ALL7), m)
            for n, p in m.named_parameters():
                p.requires_grad_("lora_" in n)
        elif kind == "guardspace":
            prepare_guardspace_model(m, art, rank=RANK)  # projection in every forward
        else:  # per-step projection; this bare loop has no after_step: the version check projects
            GuardSpace(GuardSpaceConfig(rank=RANK), art).modify_model(m)
        losses = train_steps(m)
        harm = float((logits(m, batch) - ref).norm() / ref.norm())
        train = float((logits(m, (data, torch.ones_like(data))) - ref_train).norm() / ref_train.norm())
        res[kind] = {"harmful": harm, "train": train, "loss_drop": losses[0] - min(losses[-2:])}
    print(f"\nrelative logit change on the harmful calibration prompts: {res}")
    for kind in ("guardspace", "guardspace_step"):
        ratio = res[kind]["harmful"] / res["lora"]["harmful"]
        selectivity = (res[kind]["harmful"] / res[kind]["train"]) / (res["lora"]["harmful"] / res["lora"]["train"])
        print(f"{kind}: ratio to lora = {ratio:.3f}; per unit of training-data change: {selectivity:.3f}")
        assert res[kind]["loss_drop"] > 0.1  # it did learn the training data
        assert ratio < 0.3 and selectivity < 0.2


def _range_share(layers) -> float:
    """Largest ‖A R‖/‖A‖ over the layers: the part of the raw lora_A weight outside the null space."""
    out = 0.0
    for layer in layers.values():
        a = layer.lora_A[layer.gs_adapter]
        out = max(out, float((a.weight.detach() @ a.gs_basis).norm() / a.weight.detach().norm()))
    return out


def test_step_projection_keeps_A_in_the_null_space(gs_art, tok, chat_rows, tmp_path):
    """Callback path (default ``projection: step``): the forward is a plain LoRA product and after every optimizer
    step A = A P. Forward mode leaves the raw A outside the null space (only its product is projected), so the check
    below can fail."""
    from safeguard_plugin.integrations.trl import SafeguardCallback

    from helpers import train

    _, path = gs_art
    m = model()
    tr, _ = train("callback", chat_rows, tok, tmp_path, {"artifact": str(path), "guardspace": {"rank": RANK}},
                  model=m, max_steps=3)
    layers = guardspace_layers(m)
    assert all(not la.lora_A["default"].project_in_forward for la in layers.values())
    assert _range_share(layers) < 1e-5
    (cb,) = [c for c in tr.callback_handler.callbacks if isinstance(c, SafeguardCallback)]
    assert cb.engine.constraints[0].config.projection == "step"

    fwd = prepare_guardspace_model(model(), path, rank=RANK)
    train_steps(fwd, steps=3)
    assert _range_share(guardspace_layers(fwd)) > 1e-2
    # the callback switches a prepared (forward-mode) model to per-step projection, projecting A once first
    GuardSpace(GuardSpaceConfig(rank=RANK), gs_art[0]).modify_model(fwd)
    assert _range_share(guardspace_layers(fwd)) < 1e-5
    # a raw write (e.g. load_state_dict of a forward-mode A): eval uses the projected product without touching the
    # weight; the next training forward projects the weight in place
    a = guardspace_layers(fwd)["0.self_attn.q_proj"].lora_A["default"]
    raw = torch.randn_like(a.weight)
    with torch.no_grad():
        a.weight.copy_(raw)
    x = torch.randn(3, HIDDEN)
    a.eval()
    assert torch.allclose(a(x), x @ (raw - raw @ a.gs_basis @ a.gs_basis.T).T, atol=1e-5)
    assert torch.equal(a.weight, raw)
    a.train()
    a(x)
    assert float((a.weight.detach() @ a.gs_basis).norm()) < 1e-5 * float(a.weight.detach().norm())


def test_empty_or_trivial_null_space_fails_naming_the_layer(tok, gs_art):
    harmful = load_prompts("harmful").train[:40]  # ~1500 tokens in 64 dims: full-rank covariance
    with pytest.raises(GuardSpaceError, match=r"layer \d+\.(self_attn|mlp)\.\w+_proj \(input dim \d+\).*null space is empty"):
        calibrate_guardspace(tiny_model(), tok, harmful, config={"null_energy": 0.0}, progress=False)
    art, _ = gs_art
    with pytest.raises(GuardSpaceError, match=r"layer 0\.\S+ .*below min_null_dim=250"):
        GuardSpace(GuardSpaceConfig(min_null_dim=250), art)
    with pytest.raises(GuardSpaceError, match=r"layer 0\.\S+ .*near identity"):
        GuardSpace(GuardSpaceConfig(max_null_fraction=0.05), art)
    with pytest.raises(GuardSpaceError, match="below the artifact's calibrated threshold"):
        GuardSpace(GuardSpaceConfig(null_energy=0.001), art)


def test_near_identity_projector_error_names_the_cause(gs_art):
    """Rank deficiency (few calibration tokens) and a massive activation (one direction holding nearly all the
    energy) both give a near-identity projector; the error says which one it is and what to change."""
    import copy

    art, _ = gs_art
    with pytest.raises(GuardSpaceError, match="rank-deficient"):
        GuardSpace(GuardSpaceConfig(max_null_fraction=0.05), art)
    massive = copy.deepcopy(art)
    meta = massive.manifest["components"]["guardspace"]
    for g in meta["groups"].values():
        g["lambda_max"] = 0.9995 * g["trace"]
    with pytest.raises(GuardSpaceError, match=r"holds 99\.95% of the harmful-input energy .*massive activation.*"
                                              "target_modules"):
        GuardSpace(GuardSpaceConfig(max_null_fraction=0.05), massive)


def test_save_reload_export_and_merge_keep_projector(gs_art, batch, tmp_path):
    art, _ = gs_art
    m = prepare_guardspace_model(model(), art, rank=RANK)
    train_steps(m, steps=4)
    trained = logits(m, batch)
    save_guardspace(m, tmp_path / "gs")
    # 1) our loader: projector, residual and factors restored -> identical outputs, trainable again
    re = load_guardspace(model(), tmp_path / "gs")
    assert (logits(re, batch) - trained).abs().max() < 1e-5
    a = guardspace_layers(re)["1.mlp.down_proj"].lora_A["default"]
    assert a.gs_basis is not None and a.gs_basis.shape[1] < a.in_features
    assert any(p.requires_grad for p in re.parameters())
    # 2) vanilla PEFT on the original base: the exported rank-2r adapter has the projector folded in
    vanilla = PeftModel.from_pretrained(model(), tmp_path / "gs")
    assert (logits(vanilla, batch) - trained).abs().max() < 1e-4
    # 3) merge for deployment: W_res + s·B·A·P
    merged = merge_guardspace(re)
    assert not guardspace_layers(merged)
    assert (logits(merged, batch) - trained).abs().max() < 1e-4


def test_existing_peft_lora_is_converted_and_offset_mode_matches(gs_art, batch):
    art, _ = gs_art
    ref = logits(model(), batch)
    outs = {}
    for residual in ("weights", "offset"):
        torch.manual_seed(0)
        pm = get_peft_model(model(), LoraConfig(r=RANK, lora_alpha=8, target_modules=ALL7, task_type="CAUSAL_LM"))
        GuardSpace(GuardSpaceConfig(residual=residual), art).modify_model(pm)
        assert (logits(pm, batch) - ref).abs().max() < 1e-4
        train_steps(pm, steps=4)
        with pm.disable_adapter():  # engine reference values: the original model
            assert (logits(pm, batch) - ref).abs().max() < 1e-4
        outs[residual] = logits(pm, batch)
        merged = pm.merge_and_unload()
        assert (logits(merged, batch) - outs[residual]).abs().max() < 1e-4
    assert (outs["weights"] - outs["offset"]).abs().max() < 1e-4


def test_trl_with_prepared_model_no_peft_config(gs_art, tok, chat_rows, tmp_path):
    from helpers import train

    art, _ = gs_art
    m = prepare_guardspace_model(model(), art, rank=RANK)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    tr, state = train("plain", chat_rows, tok, tmp_path, model=m, max_steps=2)
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)


def test_trl_callback_injects_and_trains_adapters_only(gs_art, tok, chat_rows, tmp_path):
    from helpers import train

    _, path = gs_art
    m = model()
    cfg = {"artifact": str(path), "guardspace": {"rank": RANK}}
    tr, state = train("callback", chat_rows, tok, tmp_path, cfg, model=m, max_steps=3)
    assert tr.model is m
    layers = guardspace_layers(m)
    assert len(layers) == 28
    from safeguard_plugin.integrations.trl import SafeguardCallback

    (cb,) = [c for c in tr.callback_handler.callbacks if isinstance(c, SafeguardCallback)]
    gs = cb.engine.constraints[0]
    for layer in layers.values():
        a = layer.lora_A["default"]
        assert not torch.equal(a.weight, a.gs_init_A) or not torch.equal(layer.lora_B["default"].weight, a.gs_init_B)
        assert not layer.base_layer.weight.requires_grad
    assert any("safeguard/guardspace_update_norm" in h for h in tr.state.log_history)
    assert gs.null_space_report()["0.self_attn.q_proj"]["null_dim"] > 0


def test_trl_callback_saves_guardspace_at_checkpoints_and_save_model(gs_art, tok, chat_rows, batch, tmp_path, caplog):
    """Nothing for the user to do: the trainer's own saves (checkpoint-N, save_model) hold the trained model, projector
    included (GuardSpace.save_model through the callback), never the trainer's full model.safetensors."""
    import logging

    from helpers import train

    _, path = gs_art
    m = model()
    cfg = {"artifact": str(path), "guardspace": {"rank": RANK}}
    with caplog.at_level(logging.INFO, logger="safeguard_plugin"):
        tr, _ = train("callback", chat_rows, tok, tmp_path, cfg, model=m, max_steps=3, save_strategy="steps",
                      save_steps=2)
        tr.save_model()  # what TRL scripts call after train(): output_dir
    trained = logits(m, batch)
    final, ckpt = tmp_path, tmp_path / "checkpoint-2"
    assert f"guardspace wrote the trained model to {final}; projector included" in caplog.text
    assert f"to {ckpt}" in caplog.text and not (ckpt / "model.safetensors").exists()
    re = load_guardspace(model(), final)
    assert (logits(re, batch) - trained).abs().max() < 1e-5
    assert (logits(PeftModel.from_pretrained(model(), final), batch) - trained).abs().max() < 1e-4
    # the step-2 checkpoint is another model (one more step was taken after it)
    assert (logits(load_guardspace(model(), ckpt), batch) - trained).abs().max() > 1e-4
    # without the projector (what a plain LoRA save keeps: A, B on the original base) the outputs differ
    gs = guardspace_layers(re)
    naive = inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=sorted(
        f"model.layers.{k}" for k in gs), init_lora_weights=False), model())
    with torch.no_grad():
        for k, layer in guardspace_layers(m).items():
            i, _, name = k.partition(".")
            tgt = naive.model.layers[int(i)].get_submodule(name)
            tgt.lora_A["default"].weight.copy_(layer.lora_A["default"].weight)
            tgt.lora_B["default"].weight.copy_(layer.lora_B["default"].weight)
    assert (logits(naive, batch) - trained).abs().max() > 1e-3


def test_massive_activation_directions_are_blocked_and_the_budget_applies_to_the_rest(monkeypatch, tok, harmful):
    """One input dim with a huge constant value (a massive activation) holds almost all the energy: the plain rule
    then blocks ~1 direction (near-identity projector). With ``massive_share`` that direction is always blocked and
    null_energy applies to the remaining energy, in the exact and the randomized decomposition alike."""
    g = torch.Generator().manual_seed(0)
    d = 300
    X = torch.randn(2000, d, generator=g, dtype=torch.float64) * torch.logspace(0, -2, d, dtype=torch.float64)
    X[:, 7] += 300.0
    C = X.T @ X / 2000
    R0, _, trace, _ = gsm._range_basis(C, 0.01)
    assert R0.shape[1] <= 2
    for exact_max in (2048, 64):
        monkeypatch.setattr(gsm, "EXACT_EIGH_MAX", exact_max)
        R, ev, tr, lam_max = gsm._range_basis(C, 0.01, massive=0.9)
        rest = tr - lam_max
        assert lam_max / tr > 0.99 and R.shape[1] > 20
        assert tr - float(ev.sum()) <= 0.01 * rest * (1 + 1e-6)  # null space holds ≤ 1% of the non-massive energy
        assert float((R.T @ R - torch.eye(R.shape[1], dtype=R.dtype)).abs().max()) < 1e-6
    # through calibration: recorded in the manifest, and used again at training time
    art = calibrate_guardspace(model(), tok, harmful, config={"null_energy": 0.01, "massive_share": 0.9,
                                                             "calibration": {"calibration_rank": 8}}, progress=False)
    assert art.manifest["components"]["guardspace"]["massive_share"] == 0.9
    GuardSpace(GuardSpaceConfig(massive_share=0.9), art)
