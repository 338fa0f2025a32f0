"""The anchor constraint: token-wise KL to the original model on the first response tokens of anchor prompts."""

from __future__ import annotations

import logging
import random
from typing import Any

import torch

from ...errors import ConfigError, SafeguardRuntimeError
from ..base import BatchView, Constraint, Runtime, TrainContext
from .config import AnchorConfig

logger = logging.getLogger("safeguard_plugin")

# log(1 - e^x) is clamped here: a reference (or model) that puts all its mass on its top k leaves ~0 for the rest
_MAX_TOP_LOGMASS = -1e-6


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, stable on both sides of ``-log 2`` (x is clamped just below 0)."""
    x = x.clamp(max=_MAX_TOP_LOGMASS)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def coarse_kl(ref_lp: torch.Tensor, ref_rest: torch.Tensor, ref_idx: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(π_ref ‖ π_θ) per row over the buckets {ref's top-k tokens, everything else}: ``ref_lp`` / ``ref_idx``
    ``(n, k)`` the reference's top-k log-probs and tokens, ``ref_rest`` ``(n,)`` the log of its remaining mass,
    ``logq`` ``(n, V)`` the model's log-probs. ``>= 0``, and 0 iff the model matches the reference on the buckets."""
    q_top = logq.gather(1, ref_idx)
    q_rest = log1mexp(torch.logsumexp(q_top, -1))
    kl_top = (ref_lp.exp() * (ref_lp - q_top)).sum(-1)
    p_rest = ref_rest.exp()
    return kl_top + torch.where(p_rest > 0, p_rest * (ref_rest - q_rest), torch.zeros_like(p_rest))


def left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, position_ids)`` of left-padded sequences; positions count real tokens only, as
    ``generate`` does, so a sequence's values do not depend on how much it was padded."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, n - len(s):] = torch.as_tensor(s, dtype=torch.long)
        mask[i, n - len(s):] = 1
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), pos.to(device)


# A graph-carrying second forward inside the training forward breaks ZeRO-3's parameter gathering in the backward
# ("size of tensor a (64) must match the size of tensor b (0)", tests/test_deepspeed.py); ZeRO-2 is tested and works.
ZERO3_MESSAGE = ("anchor does not run under DeepSpeed ZeRO-3 (its extra forward of the anchor prompts inside the "
                 "training forward breaks ZeRO-3's parameter gathering in the backward): use ZeRO-2 (or no DeepSpeed), "
                 "or remove the anchor section (preset: recommended users: `anchor: {enabled: false}`)")


class Anchor(Constraint):
    name = "anchor"
    config_class = AnchorConfig
    uses_reference = True  # the original model's answers, decoded before the first update
    prompt_reference = False
    uses_final_hidden = True  # acts at every micro-batch, whatever its rows (and gets the LM head)

    def __init__(self, config: AnchorConfig, artifact):
        super().__init__(config, artifact)
        self._cache: dict[str, torch.Tensor] | None = None
        self._order: list[int] = []
        self._cursor = 0
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.context = None  # the training rows' own header (modeling.SharedContext), found in precompute / prefetch
        self._reset_period()

    def _reset_period(self) -> None:
        self._sum_kl = self._sum_agree = self._sum_pen = 0.0
        self._n = 0

    # ------------------------------------------------------------------ the anchor pool and its reference
    def pool(self) -> list[str]:
        """The anchor prompts: the train splits of ``prompts``, taken in turn, up to ``pool_size`` (no duplicates)."""
        from ...data import load_prompts

        sets = [list(load_prompts(spec, need_split=False).train) for spec in self.config.prompts]
        out: list[str] = []
        seen: set[str] = set()
        for i in range(max(len(s) for s in sets)):
            for s in sets:
                if i < len(s) and s[i] not in seen and len(out) < self.config.pool_size:
                    out.append(s[i])
                    seen.add(s[i])
        if not out:
            raise ConfigError(f"anchor.prompts {self.config.prompts}: no prompt in their train splits")
        return out

    def find_context(self, tokenizer, rows: list[list[int]]) -> None:
        """With ``context: data``, find the header (system prompt) the training ``rows`` share, if any, and log it."""
        from ...modeling import shared_context

        if self.config.context != "data" or tokenizer is None:
            return
        self.context, why = shared_context(tokenizer, rows)
        if self.context is not None:
            logger.info("safeguard: anchor: %s; anchor prompts are formatted under it: %r", why,
                        tokenizer.decode(list(self.context.prefix))[-300:])
        else:
            logger.info("safeguard: anchor: anchor prompts use the chat template's own formatting (%s)", why)

    def _format(self, tok) -> list[list[int]]:
        from ...modeling import tokenize_prompts

        prompts = tokenize_prompts(tok, self.pool())
        if self.context is None:
            return prompts
        moved = [self.context.to_data(p) for p in prompts]
        if any(m is None for m in moved):
            logger.warning("safeguard: anchor: %d of %d anchor prompts do not start with the template's header and "
                           "keep its formatting", sum(m is None for m in moved), len(moved))
        return [p if m is None else m for p, m in zip(prompts, moved)]

    @torch.no_grad()
    def build(self, runtime: Runtime, batch_size: int = 16, progress: bool = False) -> int:
        """Decode the original model's first ``tokens`` greedy tokens for every anchor prompt and keep, per token, its
        top-k log-probs and the remaining mass. Needs the original weights (PEFT: always; full fine-tuning: before the
        first update)."""
        tok = runtime.tokenizer
        if tok is None:
            raise ConfigError("anchor: the trainer has no tokenizer to format the anchor prompts with; pass "
                              "processing_class / tokenizer to the trainer")
        if not runtime.reference_available():
            raise SafeguardRuntimeError(
                "anchor: the original model's answers to the anchor prompts were not computed before full fine-tuning "
                "changed the weights, and cannot be now. Let SafeguardCallback precompute references at train begin "
                "(precompute_references=True), resume from a checkpoint written with safeguard active, or train a "
                "PEFT adapter.")
        model = runtime.model
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        prompts = self._format(tok)
        T, k = self.config.tokens, self.config.ref_top_k
        dev = next(model.parameters()).device
        seqs, lps, rests, idxs, oks = [], [], [], [], []
        stops = {t for t in (tok.eos_token_id, tok.pad_token_id) if t is not None}
        starts = range(0, len(prompts), batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="safeguard: anchor reference answers", unit="batch")
        with runtime.reference() as ref:  # adapters disabled, eval, no grad, the engine's hooks inactive
            for s in starts:
                cur = [list(p) for p in prompts[s:s + batch_size]]
                lp, rest, idx, ok = self._decode(ref, cur, pad, stops, T, k, dev)
                seqs += cur
                lps.append(lp)
                idxs.append(idx)
                rests.append(rest)
                oks.append(ok)
        n = max(len(x) for x in seqs)
        padded = torch.full((len(seqs), n), pad, dtype=torch.long)
        for i, x in enumerate(seqs):
            padded[i, : len(x)] = torch.as_tensor(x)
        self._cache = {"seqs": padded, "lens": torch.tensor([len(x) for x in seqs]), "lp": torch.cat(lps).float(),
                       "idx": torch.cat(idxs), "rest": torch.cat(rests).float(), "ok": torch.cat(oks),
                       "pad": torch.tensor(pad)}
        return len(seqs)

    @staticmethod
    def _decode(model, cur: list[list[int]], pad: int, stops: set[int], T: int, k: int, dev):
        """Greedy-decode ``T`` tokens after each prompt in ``cur`` (appended in place) with a KV cache; per step the
        top-k log-probs, the log of the remaining mass and whether the answer is still running (before its EOS)."""
        from ...modeling import own_forward

        ids, mask, pos = left_pad(cur, pad, dev)
        alive = torch.ones(len(cur), dtype=torch.bool)
        out_lp, out_rest, out_idx, out_ok = [], [], [], []
        past = None
        for _ in range(T):
            with own_forward(model):
                out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=past, use_cache=True,
                            logits_to_keep=1)
            past = out.past_key_values
            logp = out.logits[:, -1].float().log_softmax(-1)
            top = logp.topk(min(k, logp.shape[-1] - 1), dim=-1)
            out_lp.append(top.values.cpu())
            out_idx.append(top.indices.cpu())
            out_rest.append(log1mexp(torch.logsumexp(top.values, -1)).cpu())
            out_ok.append(alive.clone())
            nxt = top.indices[:, 0]
            for i, t in enumerate(nxt.tolist()):
                cur[i].append(t)
                if t in stops:
                    alive[i] = False
            ids = nxt[:, None]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            pos = pos[:, -1:] + 1
        return (torch.stack(out_lp, 1), torch.stack(out_rest, 1), torch.stack(out_idx, 1), torch.stack(out_ok, 1))

    def prepare(self, ctx: TrainContext) -> None:
        from ...distributed import zero3_active

        if zero3_active(ctx.model):
            raise ConfigError(ZERO3_MESSAGE)

    def precompute(self, ctx: TrainContext, batches: list[dict[str, Any]], batch_size: int = 16,
                   progress: bool = True) -> int:
        from ...modeling import batch_rows

        if self._cache is not None:
            return 0
        self.find_context(ctx.runtime.tokenizer, [r for b in batches for r in batch_rows(b)])
        return self.build(ctx.runtime, batch_size=batch_size, progress=progress)

    def _next(self) -> list[int]:
        n = int(self._cache["lens"].shape[0])
        out = []
        for _ in range(min(self.config.batch_size, n)):
            if self._cursor % n == 0 or len(self._order) != n:
                self._order = list(range(n))
                random.Random(self.config.seed + self._cursor // n).shuffle(self._order)
            out.append(self._order[self._cursor % n])
            self._cursor += 1
        return out

    # ------------------------------------------------------------------ training
    def prefetch(self, batch: BatchView) -> None:
        rt = batch.runtime
        if self._cache is None:  # LoRA without the pre-training pass (streaming data): the adapter-disabled model
            from ...modeling import batch_rows

            self.find_context(rt.tokenizer, batch_rows({"input_ids": batch.input_ids,
                                                        "attention_mask": batch.attention_mask}))
            self.build(rt)
        sel = self._next()
        c, T = self._cache, self.config.tokens
        seqs = [c["seqs"][i, : int(c["lens"][i]) - 1].tolist() for i in sel]  # prompt + the first T-1 answer tokens
        ids, mask, pos = left_pad(seqs, int(c["pad"]), batch.hidden.device if batch.hidden is not None else "cpu")
        h = rt.policy_hidden(ids, attention_mask=mask, position_ids=pos)
        self._pending = (h[:, -T:], torch.as_tensor(sel))  # the positions that predict answer tokens 1..T

    def penalty(self, batch: BatchView) -> torch.Tensor | None:
        if self._pending is None or batch.head is None:
            return None
        h, sel = self._pending
        self._pending = None
        c, dev = self._cache, h.device
        ok = c["ok"][sel].flatten().to(dev)
        if not bool(ok.any()):  # every drawn prompt's original answer ended at once: nothing to anchor here
            return None
        # the drawn prompts' reference buckets, one row per anchored token that is still part of the answer
        ref_lp, ref_rest, ref_idx = (c[key][sel].flatten(0, 1).to(dev)[ok] for key in ("lp", "rest", "idx"))
        logq = batch.head.logits(h.flatten(0, 1)[ok]).log_softmax(-1)
        kl = coarse_kl(ref_lp, ref_rest, ref_idx, logq).mean()
        pen = self.config.weight * kl
        with torch.no_grad():
            agree = logq.argmax(-1) == ref_idx[:, 0]
            self._sum_kl += float(kl)
            self._sum_agree += float(agree.float().mean())
            self._sum_pen += float(pen)
            self._n += 1
        return pen

    def metrics(self) -> dict[str, float]:
        if not self._n:
            return {}
        out = {"anchor_kl": self._sum_kl / self._n, "anchor_agree": self._sum_agree / self._n,
               "anchor_loss": self._sum_pen / self._n}
        self._reset_period()
        return out

    # ------------------------------------------------------------------ checkpoints: the reference answers
    def state_dict(self) -> dict[str, Any]:
        if self._cache is None:
            return {}
        return {**{f"cache.{k}": v for k, v in self._cache.items()}, "cursor": self._cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        cache = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("cache.")}
        if cache:
            self._cache = cache
            self._cursor = int(state.get("cursor", 0))
            self._order = []
