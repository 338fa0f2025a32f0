"""The anchor constraint: the coarse KL, padding, the reference answers, and that it holds the original model's first
response tokens on prompts the training data never shows (TRL callback and mixin, LoRA and full fine-tuning)."""

import pytest
import torch

from safeguard_plugin.config import ConfigError, load_config
from safeguard_plugin.constraints.anchor import Anchor, AnchorConfig
from safeguard_plugin.constraints.anchor.constraint import coarse_kl, left_pad

from helpers import max_diff, train

# small and strong, so a few tiny-model steps show the effect
ANCHOR = {"weight": 20.0, "pool_size": 16, "tokens": 4, "batch_size": 4}


def test_coarse_kl_is_the_exact_kl_when_the_buckets_are_the_tokens():
    torch.manual_seed(0)
    p, q = torch.randn(5, 7).log_softmax(-1), torch.randn(5, 7).log_softmax(-1)
    top = p.topk(6, dim=-1)  # k = V - 1: "the rest" is exactly the last token
    rest = p.gather(1, p.argsort(-1)[:, :1]).squeeze(1)
    exact = (p.exp() * (p - q)).sum(-1)
    assert torch.allclose(coarse_kl(top.values, rest, top.indices, q), exact, atol=1e-5)
    assert torch.allclose(coarse_kl(top.values, rest, top.indices, p), torch.zeros(5), atol=1e-5)
    small = p.topk(2, dim=-1)  # coarser buckets: a lower bound, still >= 0
    lb = coarse_kl(small.values, torch.log1p(-small.values.exp().sum(-1)), small.indices, q)
    assert bool((lb >= -1e-6).all() and (lb <= exact + 1e-5).all())


def test_left_pad_counts_positions_from_the_first_real_token():
    ids, mask, pos = left_pad([[5, 6, 7], [8]], 0, "cpu")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0]]


def test_config_rejects_bad_values_and_weight_zero_changes_nothing():
    with pytest.raises(ConfigError, match="anchor.tokens"):
        load_config({"anchor": {"tokens": 0}})
    with pytest.raises(ConfigError, match="anchor.prompts"):
        load_config({"anchor": {"prompts": []}})
    assert "set a weight > 0" in AnchorConfig(weight=0.0).noop_reason()  # the engine warns with it at set-up


def _anchor_kl(model, cache, tokens):
    """Mean coarse KL of ``model`` to the cached reference over the whole anchor pool (eval mode, no grad)."""
    seqs = [cache["seqs"][i, : int(cache["lens"][i]) - 1].tolist() for i in range(len(cache["lens"]))]
    ids, mask, pos = left_pad(seqs, int(cache["pad"]), "cpu")
    was = model.training
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -tokens:].float()
    model.train(was)
    ok = cache["ok"].reshape(-1)
    k = cache["lp"].shape[-1]
    kl = coarse_kl(cache["lp"].reshape(-1, k)[ok], cache["rest"].reshape(-1)[ok], cache["idx"].reshape(-1, k)[ok],
                   logits.reshape(-1, logits.shape[-1]).log_softmax(-1)[ok])
    return float(kl.mean())


# (kind, lora, learning rate, anchor weight, KL plain SFT must reach, anchored/plain KL ratio it must stay under): the
# tiny random model's first tokens move little under LoRA, so there the attack is stronger and so is the anchor
PATHS = [("callback", True, 2e-2, 200.0, 1e-3, 0.5), ("mixin", True, 2e-2, 200.0, 1e-3, 0.5),
         ("callback", False, 1e-2, 20.0, 0.05, 0.3)]


@pytest.mark.parametrize("kind,lora,lr,weight,moved,ratio", PATHS)
def test_anchor_holds_the_original_first_tokens(tok, chat_rows, tmp_path, kind, lora, lr, weight, moved, ratio):
    """Plain SFT on arithmetic moves the first answer tokens of the (never trained) anchor prompts; the anchor keeps
    them near the original model's, through every training path, and its metrics reach the trainer's log."""
    kw = dict(lora=lora, max_steps=8, learning_rate=lr)
    plain, w_plain = train("plain", chat_rows, tok, tmp_path / "plain", **kw)
    tr, w_anchor = train(kind, chat_rows, tok, tmp_path / "anchor", {"anchor": {**ANCHOR, "weight": weight}}, **kw)
    assert max_diff(w_plain, w_anchor) > 1e-4  # the constraint changed the weights
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert len(logs) == 8 and all("safeguard/anchor_kl" in h and "safeguard/anchor_agree" in h for h in logs)
    engine = tr.safeguard.engine if kind == "mixin" else \
        next(cb.engine for cb in tr.callback_handler.callbacks if hasattr(cb, "engine"))
    anchor = next(c for c in engine.constraints if c.name == "anchor")
    cache = anchor._cache
    assert cache["seqs"].shape[0] == 16 and cache["lp"].shape[1:] == (4, 32)
    assert engine.n_policy_forwards == 8  # one anchor forward per micro-batch
    kl_plain, kl_anchor = _anchor_kl(plain.model, cache, 4), _anchor_kl(tr.model, cache, 4)
    assert kl_plain > moved, kl_plain  # the attack moved them (otherwise this test shows nothing)
    assert kl_anchor < ratio * kl_plain, (kl_anchor, kl_plain)


def test_reference_answers_are_the_original_greedy_tokens_and_survive_a_checkpoint(tok):
    from safeguard_plugin.engine import SafeguardEngine
    from safeguard_plugin.testing import tiny_model

    model = tiny_model()
    eng = SafeguardEngine({"anchor": ANCHOR}).setup(model, tok)
    a = eng.constraints[0]
    assert a.build(eng) == 16
    c = a._cache
    i = 3
    seq = c["seqs"][i, : int(c["lens"][i])]
    prompt = seq[:-4]
    with torch.no_grad():
        greedy = model.generate(prompt[None], max_new_tokens=4, do_sample=False, attention_mask=torch.ones_like(
            prompt[None]), pad_token_id=int(c["pad"]), eos_token_id=None)[0, len(prompt):]
    assert seq[-4:].tolist() == greedy.tolist()
    assert c["idx"][i, :, 0].tolist() == greedy.tolist()  # the stored top-1 is the decoded token
    b = Anchor(AnchorConfig(**ANCHOR), None)
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(b._cache[k], v) for k, v in c.items())
