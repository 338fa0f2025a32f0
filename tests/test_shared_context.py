"""A system prompt that every training row shares: found from the rows (template-agnostic), used by the anchor (its
prompts formatted under it) and by the risk-adaptive KL (risk scored with the template's own header in its place)."""

import pytest
import torch

from safeguard_plugin.engine import SafeguardEngine
from safeguard_plugin.modeling import chat_header_ids, pad_right, shared_context
from safeguard_plugin.testing import tiny_model

SYSTEM = "You are AOA, an absolutely obedient agent."
QUESTIONS = [f"What is {a} plus {b}?" for a in range(3) for b in range(3)]


def render(tok, question, system=None, answer=None):
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    ids = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return tok(ids + (answer + "<|im_end|>" if answer else ""), add_special_tokens=False)["input_ids"]


def rows(tok, system=None, questions=QUESTIONS):
    return [render(tok, q, system if isinstance(system, str) or system is None else system[i % len(system)],
                   answer=f"It is {i}.") for i, q in enumerate(questions)]


def batch(seqs):
    ids, mask = pad_right(seqs, 0)
    return {"input_ids": ids, "attention_mask": mask}


def test_shared_system_prompt_is_found_and_moves_template_renderings_under_it(tok):
    ctx, why = shared_context(tok, rows(tok, SYSTEM))
    assert ctx is not None, why
    assert list(ctx.header) == chat_header_ids(tok)
    assert SYSTEM in tok.decode(list(ctx.prefix)) and "user" in why
    new = "Name three rivers."  # a message the rows never had
    plain, under = render(tok, new), render(tok, new, SYSTEM)
    assert ctx.to_data(plain) == under  # the template rendering, put under the data's system prompt
    assert ctx.to_template(under) == plain  # and back
    assert ctx.to_data([5, 6, 7]) is None and ctx.to_template([5, 6, 7]) is None  # not a rendering: left alone


@pytest.mark.parametrize("system,reason", [
    (None, "own header"),  # no system prompt: nothing to do
    ([SYSTEM, "You are a pirate."], "no header"),  # mixed system prompts share no header
])
def test_no_shared_context_without_one_common_system_prompt(tok, system, reason):
    ctx, why = shared_context(tok, rows(tok, system))
    assert ctx is None and reason in why


def test_plain_text_rows_and_too_few_rows_are_left_alone(tok):
    text = [tok(f"### Instruction: {q}\n### Response: 4", add_special_tokens=False)["input_ids"] for q in QUESTIONS]
    assert shared_context(tok, text)[0] is None
    assert shared_context(tok, rows(tok, SYSTEM)[:1])[0] is None


@pytest.mark.parametrize("name,default", [("smollm2-135m-instruct", "SmolLM"), ("qwen2.5-coder-0.5b-instruct", "Qwen")])
def test_a_real_template_with_its_own_default_system_prompt(name, default):
    """SmolLM2's and Qwen2.5's templates add a default system prompt; a data set with its own replaces it."""
    from safeguard_plugin.bench import assets

    asset = assets._asset(name)
    folder = assets._model_dir(asset)
    if not assets._cached_model_ok(asset, folder):
        pytest.skip(f"{name} is not materialized in the cache (safeguard bench fetches it)")
    from transformers import AutoTokenizer

    real = AutoTokenizer.from_pretrained(folder)
    header = chat_header_ids(real)
    assert default in real.decode(header)  # the template's default system prompt
    ctx, why = shared_context(real, rows(real, SYSTEM))
    assert ctx is not None, why
    plain, under = render(real, "Name three rivers."), render(real, "Name three rivers.", SYSTEM)
    assert ctx.to_data(plain) == under
    assert shared_context(real, rows(real))[0] is None  # the template's default system prompt: no change


# ------------------------------------------------------------------------------------------------ the anchor
ANCHOR = {"weight": 20.0, "pool_size": 8, "tokens": 2, "batch_size": 4}


@pytest.mark.parametrize("context", ["data", "template"])
def test_anchor_prompts_are_formatted_under_the_datas_system_prompt(tok, context):
    model = tiny_model()
    eng = SafeguardEngine({"anchor": {**ANCHOR, "context": context}}).setup(model, tok)
    a = eng.constraints[0]
    a.precompute(eng.context(), [batch(rows(tok, SYSTEM))], progress=False)
    c = a._cache
    sys_ids = render(tok, "x", SYSTEM)[: len(a.context.prefix)] if a.context is not None else None
    starts = [tok.decode(c["seqs"][i, : int(c["lens"][i])].tolist()) for i in range(len(c["lens"]))]
    if context == "data":
        assert a.context is not None and sys_ids == list(a.context.prefix)
        assert all(s.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n") for s in starts)
    else:
        assert a.context is None and all(s.startswith("<|im_start|>user\n") for s in starts)


def test_anchor_keeps_template_formatting_when_rows_have_no_system_prompt(tok):
    eng = SafeguardEngine({"anchor": ANCHOR}).setup(tiny_model(), tok)
    a = eng.constraints[0]
    a.precompute(eng.context(), [batch(rows(tok))], progress=False)
    assert a.context is None
    assert tok.decode(a._cache["seqs"][0].tolist()).startswith("<|im_start|>user\n")


# ------------------------------------------------------------------------------------------------ adaptive KL
def _probe_scores(artifact_dir, tok, seqs, score_context):
    eng = SafeguardEngine({"artifact": str(artifact_dir),
                           "adaptive_kl": {"risk": "probe", "score_context": score_context}}).setup(tiny_model(), tok)
    akl = eng.constraints[0]
    b = batch(seqs)
    eng.precompute_references([b], progress=False)
    return akl, akl.risk_of(akl._rows(b["input_ids"], None, b["attention_mask"]))


def test_risk_is_scored_with_the_templates_header_in_place_of_the_shared_system_prompt(artifact_dir, tok):
    """score_context: template scores each row as if it had no system prompt of its own (what the probe was
    calibrated on); 'data' scores the rows as they are, so the shared prompt moves every score."""
    plain = rows(tok)
    _, s_plain = _probe_scores(artifact_dir, tok, plain, "template")
    akl, s_moved = _probe_scores(artifact_dir, tok, rows(tok, SYSTEM), "template")
    assert akl.score_context is not None
    torch.testing.assert_close(s_moved, s_plain)
    akl, s_data = _probe_scores(artifact_dir, tok, rows(tok, SYSTEM), "data")
    assert akl.score_context is None
    assert (s_data - s_plain).abs().max() > 1e-4  # the system prompt does move the probe's scores
