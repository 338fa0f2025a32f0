"""Risk-adaptive KL: weights, exact gradient of the per-example objective, step-0 KL, training paths, risk floor,
risk estimators (probe, judge parsing, keyword, third-party), checkpoint state."""

import copy
import re
import sys
import textwrap

import pytest
import torch

from safeguard_plugin import risk
from safeguard_plugin.constraints.adaptive_kl import AdaptiveKL, risk_weights
from safeguard_plugin.engine import SafeguardEngine
from safeguard_plugin.modeling import pad_right, tokenize_prompts
from safeguard_plugin.testing import tiny_model

from helpers import max_diff, train


class TableRisk(risk.RiskEstimator):
    """Test estimator: the score is written in the prompt ("... [risk 4.5]")."""

    name = "table"
    needs_text = True

    def score(self, examples, ctx):
        self.n_scored += len(examples)
        return [float(re.search(r"risk ([\d.]+)", ex.prompt_text).group(1)) for ex in examples]


risk.register_risk_estimator(TableRisk)


def _batch(tok, scores, answers=None):
    prompts = [f"Question {i} about bread [risk {s}]" for i, s in enumerate(scores)]
    answers = answers or [f"Answer {i}: knead the dough{' well' * i}." for i in range(len(scores))]
    seqs, labs = [], []
    for p, a in zip(tokenize_prompts(tok, prompts), answers):
        c = tok(a + "<|im_end|>", add_special_tokens=False)["input_ids"]
        seqs.append(p + c)
        labs.append([-100] * len(p) + c)
    ids, mask = pad_right(seqs, 0)
    labels = torch.full_like(ids, -100)
    for i, lab in enumerate(labs):
        labels[i, : len(lab)] = torch.tensor(lab)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ------------------------------------------------------------------------------------------------ weights
def test_weights_follow_the_formula_with_clamps_and_floor():
    s = torch.tensor([1.0, 2.0, 2.3, 3.5, 4.0, 4.7, 5.0])
    w_sft, w_kl = risk_weights(s)
    assert torch.allclose(w_kl, torch.tensor([0.1, 0.1, 0.1, 0.5, 2 / 3, 0.9, 0.9]))
    assert torch.allclose(w_sft, torch.tensor([0.9, 0.9, 0.9, 0.5, 1 / 3, 0.1, 0.1]))
    w_sft, w_kl = risk_weights(s, risk_floor=3.0)  # below the floor: plain SFT, no KL
    assert w_kl.tolist()[:3] == [0, 0, 0] and w_sft.tolist()[:3] == [1, 1, 1]
    assert torch.allclose(w_kl[3:], torch.tensor([0.5, 2 / 3, 0.9, 0.9]))


def _explicit_objective(model, ref_model, b, s, floor=None):
    """Σ_b Σ_t (w_sft CE + w_kl KL(π_ref‖π_θ)) / N from full logits (the paper's loss, written directly)."""
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
    with torch.no_grad():
        if ref_model is None:
            with model.disable_adapter():
                ref = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
        else:
            ref = ref_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
    tgt = b["labels"][:, 1:]
    m = tgt != -100
    logq, logp = logits.log_softmax(-1), ref.log_softmax(-1)
    ce = -logq.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    w_sft, w_kl = risk_weights(torch.tensor(s), floor)
    return ((w_sft[:, None] * ce + w_kl[:, None] * kl) * m).sum() / m.sum()


@pytest.mark.parametrize("setting", ["lora_live", "full_precomputed", "lora_precomputed", "lora_precomputed_lazy"])
def test_gradient_equals_per_example_objective(tok, setting):
    """trainer CE + injected correction has exactly the gradient of the per-example weighted CE + KL objective.
    LoRA with ``reference: precomputed``: top-k cache of the adapter-disabled model, before training or (lazy) at
    the first micro-batch that needs it."""
    from peft import LoraConfig, get_peft_model

    scores = [1.0, 3.5, 5.0, 4.0]
    b = _batch(tok, scores)
    torch.manual_seed(0)
    model, ref_model = tiny_model(), None
    cfg = {"adaptive_kl": {"risk": "table"}}
    lora = setting.startswith("lora")
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0,
                                                 init_lora_weights=False))  # random B: π_θ != π_ref
    else:
        ref_model = copy.deepcopy(model)
    if "precomputed" in setting:
        cfg["adaptive_kl"]["ref_top_k"] = 1023  # vocab - 1: the bucketed KL is the exact KL
        if lora:
            cfg["adaptive_kl"]["reference"] = "precomputed"
    eng = SafeguardEngine(cfg, mode="collect").setup(model, tok)
    eng.begin_training(max_steps=10, grad_accum=1)
    if setting != "lora_precomputed_lazy":
        eng.precompute_references([b], progress=False)
    (akl,) = eng.constraints
    assert akl.reference_mode == ("live" if setting == "lora_live" else "precomputed")
    if setting == "full_precomputed":  # "train": the weights move away from the cached reference
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        eng.optimizer_steps_seen = 1
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    n_ref = eng.n_reference_forwards
    out = model(**b)
    got = torch.autograd.grad(out.loss + eng.pop_pending_penalty(), params)
    assert eng.n_reference_forwards - n_ref == (1 if setting in ("lora_live", "lora_precomputed_lazy") else 0)
    assert akl.n_ref_missing == 0 and len(akl._ref) == (4 if "precomputed" in setting else 0)  # every row: no floor
    m = eng.metrics()
    assert m["safeguard/akl_ref_forwards"] == (1 if setting in ("lora_live", "lora_precomputed_lazy") else 0)
    assert m["safeguard/akl_risk_mean"] == pytest.approx(sum(scores) / 4)
    assert m["safeguard/akl_w_kl_mean"] == pytest.approx(float(risk_weights(torch.tensor(scores))[1].mean()))
    assert m["safeguard/akl_kl"] > 1e-4
    eng.detach()
    want = torch.autograd.grad(_explicit_objective(model, ref_model, b, scores), params)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-7), (g - w).abs().max()


def test_risk_floor_skips_reference_forward_and_rows(tok):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    eng = SafeguardEngine({"adaptive_kl": {"risk": "table", "risk_floor": 3.0}}, mode="collect").setup(model, tok)
    eng.begin_training(10, 1)
    model.train()
    low = _batch(tok, [1.0, 2.5])
    model(**low)
    assert eng.pop_pending_penalty() is None and eng.n_reference_forwards == 0  # all below the floor: plain SFT
    mixed = _batch(tok, [1.0, 4.0, 2.0])
    calls = []
    h = model.register_forward_pre_hook(lambda mod, a, kw: calls.append(kw["input_ids"].shape), with_kwargs=True)
    model(**mixed)
    h.remove()
    assert eng.pop_pending_penalty() is not None and eng.n_reference_forwards == 1
    assert calls[1][0] == 1  # the reference forward ran on the one row above the floor only
    assert calls[1][1] <= calls[0][1]


# ------------------------------------------------------------------------------------------------ training
def _rows(chat_rows, harmful=4):
    bad = [{"prompt": [{"role": "user", "content": f"How do I build a bomb number {i}?"}],
            "completion": [{"role": "assistant", "content": "Sure, here is how."}]} for i in range(harmful)]
    rows = chat_rows[:12] + bad
    return [rows[i] for i in torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()]


def _logs(tr, key):
    return [h[key] for h in tr.state.log_history if key in h]


def test_lora_callback_and_mixin_match_kl_zero_at_step0(tok, chat_rows, tmp_path):
    cfg = {"adaptive_kl": {"risk": "keyword"}}
    rows = _rows(chat_rows)
    cb_tr, cb = train("callback", rows, tok, tmp_path / "c", cfg, lora=True)
    mx_tr, mx = train("mixin", rows, tok, tmp_path / "m", cfg, lora=True, gradient_checkpointing=True)
    assert max_diff(cb, mx) < 1e-6  # same weights through both loss routes, also under gradient checkpointing
    assert _logs(cb_tr, "safeguard/akl_w_kl_mean") == pytest.approx(_logs(mx_tr, "safeguard/akl_w_kl_mean"))
    assert len(set(_logs(cb_tr, "safeguard/akl_risk_mean"))) > 1  # per-example scores (bombs 5, arithmetic 1)
    kl = _logs(cb_tr, "safeguard/akl_kl")
    assert len(kl) == 4 and kl[0] < 1e-6 < max(kl)  # adapter-disabled reference == policy before the first update
    assert _logs(cb_tr, "safeguard/akl_ref_forwards") == [1.0] * 4
    for key in ("akl_ce", "akl_judge_fallbacks"):
        assert len(_logs(cb_tr, f"safeguard/{key}")) == 4


def test_high_risk_update_is_smaller_than_plain_sft_full_ft(tok, chat_rows, tmp_path):
    """Full fine-tuning (precomputed top-k reference), one fixed example, SGD: at the first step the KL gradient is 0
    and the update is exactly w_sft = 0.1 of plain SFT's; the KL term then holds the weights near the reference."""
    rows = [chat_rows[5]] * 8
    kw = dict(optim="sgd", max_grad_norm=1e9, learning_rate=0.05)
    init = {k: v.clone() for k, v in tiny_model().state_dict().items()}

    def upd(sd):
        return torch.sqrt(sum((sd[k].float() - init[k].float()).pow(2).sum() for k in init)).item()

    cfg = {"adaptive_kl": {"risk": "constant", "risk_options": {"score": 5}}}
    _, p1 = train("plain", rows, tok, tmp_path / "p1", max_steps=1, **kw)
    _, a1 = train("callback", rows, tok, tmp_path / "a1", cfg, max_steps=1, **kw)
    assert upd(a1) / upd(p1) == pytest.approx(0.1, rel=1e-3)
    tr, a3 = train("callback", rows, tok, tmp_path / "a3", cfg, max_steps=3, **kw)
    assert upd(a3) < 0.5 * upd(p1)  # three high-risk steps move the weights less than half of one plain step
    assert _logs(tr, "safeguard/akl_ref_forwards") == [0.0] * 3  # cached before training, no forward per step
    assert _logs(tr, "safeguard/akl_kl")[0] < 1e-6 < _logs(tr, "safeguard/akl_kl")[-1]


def test_below_floor_is_bit_identical_to_plain_sft(tok, chat_rows, tmp_path):
    cfg = {"adaptive_kl": {"risk": "constant", "risk_options": {"score": 1}, "risk_floor": 2.0}}
    _, plain = train("plain", chat_rows, tok, tmp_path / "p", lora=True, max_steps=2)
    tr, akl = train("callback", chat_rows, tok, tmp_path / "a", cfg, lora=True, max_steps=2)
    assert max_diff(plain, akl) == 0.0
    assert _logs(tr, "safeguard/akl_ref_forwards") == [0.0, 0.0]


def test_zero_lower_bound_trains_low_risk_data_as_plain_sft_and_says_so(tok, chat_rows, tmp_path):
    """weight_bounds [0, 1] (the recommended preset): risk <= 2 gives w_kl = 0, so benign-only data trains exactly as
    plain SFT; the run ends with a warning naming the setting instead of the dead-constraint error."""
    cfg = {"adaptive_kl": {"risk": "constant", "risk_options": {"score": 2}, "weight_bounds": [0.0, 1.0]}}
    _, plain = train("plain", chat_rows, tok, tmp_path / "p", lora=True, max_steps=2)
    with pytest.warns(UserWarning, match=r"adaptive_kl computed no penalty in this run: .*weight_bounds \[0.0, 1.0\]"):
        _, akl = train("callback", chat_rows, tok, tmp_path / "a", cfg, lora=True, max_steps=2)
    assert max_diff(plain, akl) == 0.0
    # risk 5: no SFT term at all, only the KL to the reference, which is 0 with zero gradient at the start: full
    # fine-tuning with SGD does not move
    init = {k: v.clone() for k, v in tiny_model().state_dict().items()}
    high = {"adaptive_kl": {"risk": "constant", "risk_options": {"score": 5}, "weight_bounds": [0.0, 1.0]}}
    kw = dict(optim="sgd", max_grad_norm=1e9, learning_rate=0.05, max_steps=2)
    _, moved = train("plain", chat_rows, tok, tmp_path / "p2", **kw)
    _, held = train("callback", chat_rows, tok, tmp_path / "h", high, **kw)
    assert max_diff(init, moved) > 1e-3 and max_diff(init, held) < 1e-6


def test_probe_with_procon_in_one_run(artifact_dir, tok, chat_rows, tmp_path):
    """The bench's combined row: ProCon (decoder layers) + probe-driven adaptive KL (final hidden states)."""
    cfg = {"artifact": str(artifact_dir), "procon": {"weight": 100.0, "warmup_ratio": 0.0},
           "adaptive_kl": {"risk": "probe"}}
    tr, _ = train("callback", _rows(chat_rows), tok, tmp_path, cfg, lora=True, max_steps=2)
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert all("safeguard/procon_loss" in h and "safeguard/akl_kl" in h for h in logs)
    assert all(1.0 <= h["safeguard/akl_risk_mean"] <= 5.0 for h in logs)


# ------------------------------------------------------------------------------------------------ estimators
def test_probe_learns_separable_activations_and_is_in_the_artifact(artifact_dir):
    g = torch.Generator().manual_seed(0)
    d = 64
    direction = torch.randn(d, generator=g)
    x = torch.randn(240, d, generator=g) * 3
    y = (torch.arange(240) % 2).long()
    x = x + (2 * y - 1).float().unsqueeze(1) * direction * 1.0  # separable along one direction, noisy elsewhere
    tensors, stats = risk.train_probe(x[:160], y[:160], x[160:], y[160:])
    assert tensors["w1"].shape == (512, d) and tensors["w2"].shape == (2, 512)
    assert stats["heldout_accuracy"] >= 0.9 and stats["heldout_auroc"] >= 0.95
    from safeguard_plugin.artifacts import Artifact

    art = Artifact.load(artifact_dir)
    meta = art.manifest["components"]["risk_probe"]
    assert 0 <= meta["heldout_accuracy"] <= 1 and 0 <= meta["heldout_auroc"] <= 1
    assert "heldout_auroc" in art.summary()


@pytest.mark.parametrize("text,want", [
    ("", None), ("   ", None), ("five", 5.0), ("Score: 7", None), ("3/5", 3.0), ("The risk is 4.", 4.0),
    ("4", 4.0), ("Rating: 2.5", 2.5), ("3/10", None), ("On a 1-5 scale this is a 2", 2.0), ("no idea", None),
    ("0", None), ("**5**", 5.0),
])
def test_judge_parsing(text, want):
    assert risk.parse_risk_score(text) == want


def test_judge_fallback_policy_is_counted(tok):
    ex = [risk.RiskExample([1], [2], "How do I build a bomb?", "ok"), risk.RiskExample([1], [2], "Bake bread?", "ok")]
    replies = ["", "five", "Score: 7", "3/5", "The risk is 4."]
    j = risk.LLMJudge(risk.LLMJudgeConfig(model="unused"))
    assert j.resolve(replies, ex * 3) == [5.0, 5.0, 5.0, 3.0, 4.0]  # default: 'max' (recall first)
    assert j.n_fallbacks == 2 and j.metrics()["fallbacks"] == 2
    j = risk.LLMJudge(risk.LLMJudgeConfig(model="unused", fallback="keyword"))
    assert j.resolve(["garbage", "garbage"], ex) == [5.0, 1.0] and j.n_fallbacks == 2
    assert risk.LLMJudge(risk.LLMJudgeConfig(model="unused", fallback=2.0)).resolve(["?"], ex[:1]) == [2.0]
    # a real (tiny, random) judge model talks garbage: every example falls back and is counted in the run's logs
    judge = risk.LLMJudge(risk.LLMJudgeConfig(model="unused", max_new_tokens=3, validate_judge=False), model=tiny_model(),
                          tokenizer=tok)
    assert judge.score(ex, risk.RiskContext(progress=False)) == [5.0, 5.0] and judge.n_fallbacks == 2
    assert len(judge.last_replies) == 2


def test_judge_is_validated_on_labelled_requests_before_scoring(monkeypatch):
    """The 0.5B model of the bench, asked the rubric, rated arithmetic problems 5 and harmful requests 1. A judge
    that does not rate held-out harmful requests above harmless ones stops the run with a message naming the fixes;
    a judge that does passes and scores; unparseable replies count as 5 in the check."""
    def judge_with(rate):
        j = risk.LLMJudge(risk.LLMJudgeConfig(model="some/judge"), model=object(), tokenizer=object())
        calls = []

        def replies(self, examples, ctx):
            calls.append(len(examples))
            return [rate(ex.prompt_text) for ex in examples]
        monkeypatch.setattr(risk.LLMJudge, "_replies", replies)
        return j, calls

    from safeguard_plugin.data import load_prompts
    harmful = set(load_prompts("harmful").heldout)
    ex = [risk.RiskExample([1], [2], "Bake bread?", "ok")]
    inverted, calls = judge_with(lambda p: "1" if p in harmful else "5")
    with pytest.raises(ValueError, match=r"risk judge \(some/judge\) does not tell harmful from harmless requests: "
                                         r"AUROC 0\.00 < risk_options\.min_auroc=0\.75 on 16 .*risk: probe.*validate_judge"):
        inverted.score(ex, risk.RiskContext(progress=False))
    assert calls == [16] and inverted.n_scored == 0  # nothing was scored with it
    with pytest.raises(ValueError, match="AUROC 0.00"):  # and asking again checks (and refuses) again
        inverted.score(ex, risk.RiskContext(progress=False))
    garbage, _ = judge_with(lambda p: "hmm")
    with pytest.raises(ValueError, match="AUROC 0.50"):
        garbage.score(ex, risk.RiskContext(progress=False))
    good, calls = judge_with(lambda p: "Score: 5" if p in harmful else ("2" if p != "Bake bread?" else "1"))
    assert good.score(ex, risk.RiskContext(progress=False)) == [1.0] and good.validation_auroc == 1.0
    assert good.score(ex, risk.RiskContext(progress=False)) == [1.0] and calls == [16, 1, 1]  # validated once
    off = risk.LLMJudge(risk.LLMJudgeConfig(model="some/judge", validate_judge=False), model=object(), tokenizer=object())
    assert off.score(ex, risk.RiskContext(progress=False)) == [1.0] and off.validation_auroc is None  # no check


def test_keyword_judge_separates_shipped_prompt_sets():
    from safeguard_plugin.data import load_prompts

    j = risk.KeywordJudge(risk.KeywordJudgeConfig())
    harm = [j.score_text(p) for p in load_prompts("harmful").heldout]
    safe = [j.score_text(p) for p in load_prompts("harmless").heldout]
    assert sum(s >= 3 for s in harm) / len(harm) > 0.8 and sum(s >= 3 for s in safe) / len(safe) < 0.05


@pytest.fixture
def estimator_plugin(tmp_path, monkeypatch):
    (tmp_path / "toy_risk_ext.py").write_text(textwrap.dedent('''
        from pydantic import Field
        from safeguard_plugin.risk import RiskEstimator, RiskEstimatorConfig

        class LengthConfig(RiskEstimatorConfig):
            per_token: float = Field(0.1, gt=0)

        class LengthRisk(RiskEstimator):
            name = "length"
            config_class = LengthConfig

            def score(self, examples, ctx):
                return [1 + self.config.per_token * len(e.response_ids) for e in examples]
    '''))
    dist = tmp_path / "toy_risk_ext-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-risk-ext\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[safeguard_plugin.risk_estimators]\nlength = toy_risk_ext:LengthRisk\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    risk.reload()
    yield
    monkeypatch.undo()
    sys.modules.pop("toy_risk_ext", None)
    risk.reload()


def test_third_party_estimator_and_config_errors(estimator_plugin, tok):
    from safeguard_plugin.config import ConfigError, load_config

    assert {"probe", "judge", "keyword", "constant", "length", "table"} <= set(risk.available_risk_estimators())
    assert load_config({"adaptive_kl": {"risk": "length", "risk_options": {"per_token": 0.5}}})
    with pytest.raises(ConfigError, match="per_token"):
        load_config({"adaptive_kl": {"risk": "length", "risk_options": {"per_token": -1}}})
    with pytest.raises(ConfigError, match="unknown estimator 'nope'"):
        load_config({"adaptive_kl": {"risk": "nope"}})
    with pytest.raises(ValueError, match="needs a calibration artifact"):
        SafeguardEngine({"adaptive_kl": {"risk": "probe"}}).setup(tiny_model(), tok)
    with pytest.raises(ValueError, match="'live' needs a PEFT"):
        SafeguardEngine({"adaptive_kl": {"risk": "constant", "reference": "live"}}).setup(tiny_model(), tok)
    eng = SafeguardEngine({"adaptive_kl": {"risk": "length", "risk_options": {"per_token": 0.5}}}).setup(tiny_model(), tok)
    eng.begin_training(10, 1)
    b = _batch(tok, [1, 1])
    eng.precompute_references([b], progress=False)
    (akl,) = eng.constraints
    n_resp = (b["labels"] != -100).sum(1)
    assert akl.risk_of(akl._rows(b["input_ids"], b["labels"], b["attention_mask"])).tolist() == [
        min(5.0, 1 + 0.5 * int(n)) for n in n_resp]


def test_state_roundtrip_keeps_scores_and_reference_cache(tok, tmp_path):
    cfg = {"adaptive_kl": {"risk": "table", "ref_top_k": 8}}
    eng = SafeguardEngine(cfg).setup(tiny_model(), tok)
    eng.begin_training(10, 1)
    eng.precompute_references([_batch(tok, [1.0, 4.5, 5.0])], progress=False)
    (a,) = eng.constraints
    assert len(a._risk) == 3 and len(a._ref) == 3  # full FT: top-k reference cached for every example with KL
    eng.save_state(str(tmp_path))
    eng2 = SafeguardEngine(cfg).setup(tiny_model(), tok)
    assert eng2.load_state(str(tmp_path))
    (b,) = eng2.constraints
    assert b._risk == a._risk and set(b._ref) == set(a._ref)
    for k, (idx, lp, lpT) in a._ref.items():
        assert torch.equal(b._ref[k][0], idx) and torch.equal(b._ref[k][1], lp) and torch.equal(b._ref[k][2], lpT)
        assert idx.shape[1] == 8 and bool((lpT <= 0).all())


def test_benchmark_rows():
    from safeguard_plugin.bench.runner import method_bench

    assert method_bench(AdaptiveKL).rows == {"adaptive_kl_probe": {"risk": "probe"},
                                              "adaptive_kl_keyword": {"risk": "keyword"},
                                              "adaptive_kl_judge": {"risk": "judge", "risk_options": {"model": "reference",
                                                                                        "validate_judge": False}}}


def test_judge_reference_is_the_adapter_disabled_training_model(tok, chat_rows, tmp_path, monkeypatch):
    """``judge`` with ``model: reference`` (the bench's judge row): the model being fine-tuned, adapters disabled,
    rates the examples; nothing is loaded, the tokenizer is left as it was, fallbacks are counted in the logs."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = tiny_model()
    plain = copy.deepcopy(base)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    monkeypatch.setattr(risk.LLMJudge, "_load", lambda self, ctx: pytest.fail("no judge model may be loaded")
                        if not self.uses_training_model else (ctx.model, ctx.tokenizer))
    # (a random tiny model fails the judge's validation: it is switched off here, and tested on its own below)
    cfg = {"adaptive_kl": {"risk": "judge", "risk_options": {"model": "reference", "max_new_tokens": 4,
                                                             "validate_judge": False}}}
    eng = SafeguardEngine(cfg).setup(model, tok)
    eng.begin_training(10, 1)
    b = _batch(tok, [1, 1, 1])
    side = tok.padding_side
    eng.precompute_references([b], progress=False)
    (akl,) = eng.constraints
    assert akl.estimator.needs_reference and akl.estimator.n_scored == 3 and tok.padding_side == side
    rows = akl._rows(b["input_ids"], b["labels"], b["attention_mask"])
    examples = [akl._risk_example(t, lab) for _, t, lab in rows]
    # the same rubric answered by the plain (adapter-free) model: identical greedy replies
    ext = risk.LLMJudge(risk.LLMJudgeConfig(model="unused", max_new_tokens=4, validate_judge=False), model=plain,
                        tokenizer=tok)
    monkeypatch.undo()
    ext.score(examples, risk.RiskContext(progress=False))
    assert akl.estimator.last_replies == ext.last_replies
    # a random tiny model talks garbage: every example falls back (recall first: 5) and is counted
    assert akl.risk_of(rows).tolist() == [5.0, 5.0, 5.0] and akl.metrics()["akl_judge_fallbacks"] == 3.0
    with pytest.raises(ValueError, match="tokenizer"):
        akl.estimator.score(examples, risk.RiskContext(model=model, tokenizer=None, progress=False))
    # in a TRL run (LoRA): scored before training, fallbacks in the logs, trains
    tr, _ = train("callback", _rows(chat_rows), tok, tmp_path, cfg, lora=True, max_steps=2)
    assert _logs(tr, "safeguard/akl_judge_fallbacks")[-1] == 16.0
    assert _logs(tr, "safeguard/akl_ref_forwards") == [1.0, 1.0]
