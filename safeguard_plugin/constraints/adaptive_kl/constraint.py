"""The adaptive KL constraint: per-example risk weights and the chunked LM-head CE/KL objective."""

from __future__ import annotations

import hashlib
import logging
import math
import warnings
from typing import Any

import torch

from ...errors import ConfigError, SafeguardRuntimeError
from ...risk import RiskContext, RiskExample, available_risk_estimators, clamp_risk, get_risk_estimator
from ..base import BatchView, CalibrationContext, Constraint, OutputHead, Runtime, TrainContext, TrainingSetup
from .config import AdaptiveKLConfig

logger = logging.getLogger("safeguard_plugin")

W_MIN, W_MAX = 0.1, 0.9
_CHUNK_ELEMENTS = 1 << 23  # tokens per LM-head chunk = this / vocab (32 MB per float32 (n × V) buffer)


def risk_weights(s: torch.Tensor | float | list[float], risk_floor: float | None = None,
                 bounds: tuple[float, float] = (W_MIN, W_MAX)) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example ``(w_sft, w_kl)`` from risk scores ``s``: w_kl = clamp((s−2)/3, lo, hi), w_sft = clamp(1−w_kl, lo,
    hi) with ``bounds`` = (lo, hi) (the paper: 0.1, 0.9; (0, 1) lets a risk-5 example's SFT term vanish); below
    ``risk_floor`` (when set) w_kl = 0 and w_sft = 1 (plain SFT for that example)."""
    lo, hi = bounds
    s = torch.as_tensor(s, dtype=torch.float32)
    w_kl = ((s - 2) / 3).clamp(lo, hi)
    w_sft = (1 - w_kl).clamp(lo, hi)
    if risk_floor is not None:
        below = s < risk_floor
        w_kl = torch.where(below, torch.zeros_like(w_kl), w_kl)
        w_sft = torch.where(below, torch.ones_like(w_sft), w_sft)
    return w_sft, w_kl


# ------------------------------------------------------------------------------------------ the LM-head term
def _rowdot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Σ_v x[i, v]·y[i, v] per row, without an (n, V) temporary."""
    return torch.bmm(x.unsqueeze(1), y.unsqueeze(2)).reshape(-1)


class _HeadObjective(torch.autograd.Function):
    """Σ_t a_t·CE_t + c_t·KL_t over selected positions, through the LM head in token chunks.

    The gradient is formed chunk by chunk in the forward pass (d/dlogits = a·(q − e_y) + c·(q − p_ref)), so no
    (tokens × vocab) tensor outlives its chunk; backward only scales it. Reference: ``ref_h`` (reference final
    hidden states, exact KL) or ``ref_idx``/``ref_lp``/``ref_lpT`` (top-k log-probs + log tail mass: KL between
    the distributions coarse-grained to {top-k, rest}; the tail target is π_θ's own tail shape).
    Returns (objective, Σ CE, Σ KL); the last two are for logging.

    Cost per chunk of n tokens: one (n × d × V) matmul for the policy logits, one for the reference logits (live
    reference only) and one for the gradient wrt ``h`` (plus one for the head's own gradient when it is trained).
    Everything over the vocabulary is done in place in at most three float32 (n × V) buffers (policy logits →
    q → gradient; reference logits → log p_ref − log q; p_ref), so the chunk's peak is ~3·n·V·4 bytes.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, targets, a, c, ref_h, ref_idx, ref_lp, ref_lpT, head: OutputHead, chunk: int):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        W = weight
        gh = torch.zeros_like(h) if need_h else None
        gw = torch.zeros(W.shape, dtype=torch.float32, device=W.device) if need_w else None
        gb = torch.zeros(bias.shape, dtype=torch.float32, device=W.device) if need_b else None
        tot = torch.zeros((), dtype=torch.float32, device=h.device)
        ce_sum, kl_sum = tot.clone(), tot.clone()
        for s in range(0, h.shape[0], chunk):
            e = min(h.shape[0], s + chunk)
            hc = h[s:e].to(W.dtype)
            z, dz = head.transform(torch.nn.functional.linear(hc, W, bias).float())
            lse = torch.logsumexp(z, -1, keepdim=True)
            tc = targets[s:e].unsqueeze(1)
            ac, cc = a[s:e].unsqueeze(1).float(), c[s:e].unsqueeze(1).float()
            ce = (lse - z.gather(1, tc)).squeeze(1)  # −log q(y)
            val = (ac.squeeze(1) * ce).sum()
            kl = None
            if ref_h is not None:
                zr = head.logits(ref_h[s:e])
                lser = torch.logsumexp(zr, -1, keepdim=True)
                p = torch.sub(zr, lser).exp_()
                d = zr.sub_(z).sub_(lser - lse)  # log p − log q = (z_ref − z) − (lse_ref − lse)
                kl = _rowdot(p, d)
                del zr, d
                g = z.sub_(lse).exp_()  # q
                g.mul_(ac + cc).addcmul_(p, cc, value=-1.0)  # q·(a + c) − c·p
                del p
            elif ref_idx is not None:
                idx = ref_idx[s:e].long()
                lp, lpT = ref_lp[s:e].float(), ref_lpT[s:e].float()
                zI = z.gather(1, idx)
                z.scatter_(1, idx, float("-inf"))
                logq_T = torch.logsumexp(z, -1) - lse.squeeze(1)  # log q(rest)
                z.scatter_(1, idx, zI)
                logq_I = zI - lse
                pI, pT = lp.exp(), lpT.exp()
                kl = (pI * (lp - logq_I)).sum(-1) + torch.where(pT > 0, pT * (lpT - logq_T), 0.0)
                tail = torch.where(pT > 0, (lpT - logq_T).exp(), 0.0).unsqueeze(1)  # p_T / q_T
                # target = p_ref on the top-k, q·p_T/q_T on the rest; g = q·(a + c) − c·target
                g = z.sub_(lse).exp_()  # q
                g.mul_(ac + cc - cc * tail)
                g.scatter_(1, idx, logq_I.exp() * (ac + cc) - cc * pI)
            else:
                g = z.sub_(lse).exp_().mul_(ac)
            g.scatter_add_(1, tc, -ac)
            if kl is not None:
                val = val + (cc.squeeze(1) * kl).sum()
                kl_sum += kl.sum()
            tot += val
            ce_sum += ce.sum()
            if not (isinstance(dz, float) and dz == 1.0):
                g = g.mul_(dz)
            if need_h:
                gh[s:e] = (g.to(W.dtype) @ W).to(gh.dtype)
            if need_w:
                gw += g.T @ hc.float()
            if need_b:
                gb += g.sum(0)
            del z, g
        ctx.grads = (gh, None if gw is None else gw.to(W.dtype), None if gb is None else gb.to(bias.dtype))
        ctx.mark_non_differentiable(ce_sum, kl_sum)
        return tot, ce_sum, kl_sum

    @staticmethod
    def backward(ctx, g_tot, _g_ce, _g_kl):
        gh, gw, gb = ctx.grads
        ctx.grads = None
        scale = lambda t: None if t is None else t * g_tot.to(t.dtype)  # noqa: E731
        return (scale(gh), scale(gw), scale(gb)) + (None,) * 9


# ------------------------------------------------------------------------------------------ the constraint
def _live_rows(kl_rows: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Rows of the live reference forward and its length (up to their last response token)."""
    rid = kl_rows.nonzero().flatten()
    m_sub = mask[rid.to(mask.device)]
    return rid, int((m_sub * torch.arange(1, m_sub.shape[1] + 1, device=m_sub.device)).max())


def _example_key(tokens: torch.Tensor, trained: torch.Tensor) -> bytes:
    h = hashlib.blake2b(tokens.to(torch.int64).numpy().tobytes(), digest_size=16)
    h.update(trained.to(torch.uint8).numpy().tobytes())
    return h.digest()


class AdaptiveKL(Constraint):
    name = "adaptive_kl"
    config_class = AdaptiveKLConfig
    uses_reference = True  # integrations run the pre-training pass (risk scores, precomputed references)
    prompt_reference = False  # ... but this constraint needs no per-prompt activation cache
    uses_final_hidden = True

    def __init__(self, config: AdaptiveKLConfig, artifact):
        super().__init__(config, artifact)
        est_cls = get_risk_estimator(config.risk)
        self.estimator = est_cls(est_cls.config_class.model_validate(config.risk_options), artifact)
        self._risk: dict[bytes, float] = {}
        self._ref: dict[bytes, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._runtime: Runtime | None = None
        self._mode: str | None = None
        self.n_ref_forwards = 0  # cumulative live reference forwards
        self.n_risk_missing = 0
        self.n_ref_missing = 0
        self._warned: set[str] = set()
        self.score_context = None  # the rows' shared header, replaced by the template's for scoring (modeling.SharedContext)
        self._context_checked = False
        self._reset_period()

    # -- set-up
    def _reset_period(self) -> None:
        self._p = {"rows": 0, "risk": 0.0, "w_kl": 0.0, "ce": 0.0, "ce_n": 0, "kl": 0.0, "kl_n": 0, "ref": 0}

    def validate_model(self, model: torch.nn.Module) -> None:
        from ...modeling import is_peft_model

        if self.config.reference == "live" and not is_peft_model(model):
            raise ConfigError("adaptive_kl.reference: 'live' needs a PEFT (LoRA/QLoRA) model, whose adapter-disabled "
                             "forward is the reference; for full fine-tuning use 'precomputed' (or 'auto')")
        if hasattr(self.estimator, "validate_model"):
            self.estimator.validate_model(model)

    @classmethod
    def check_training(cls, config: AdaptiveKLConfig, setup: TrainingSetup) -> None:
        if setup.packing:
            fix = {"axolotl": "set `sample_packing: false`", "trl": "set packing=False, padding_free=False"}.get(
                setup.framework, "train one example per row")
            raise ConfigError(f"adaptive_kl needs one example per row: packing / padding-free batches are not "
                              f"supported ({fix})")

    def _bind(self, runtime: Runtime | None) -> None:
        if runtime is None or (self._runtime is runtime and self._mode is not None):
            return
        from ...modeling import is_peft_model

        self._runtime = runtime
        mode = self.config.reference
        if mode == "auto":
            mode = "live" if is_peft_model(runtime.model) else "precomputed"
        self._mode = mode

    def prepare(self, ctx: TrainContext) -> None:
        self._bind(ctx.runtime)

    @property
    def reference_mode(self) -> str | None:
        return self._mode

    def _warn_once(self, tag: str, msg: str) -> None:
        if tag not in self._warned:
            self._warned.add(tag)
            warnings.warn(f"safeguard: adaptive_kl: {msg}", stacklevel=3)

    # -- examples and risk scores
    def _rows(self, ids: torch.Tensor, labels: torch.Tensor | None, attn: torch.Tensor | None):
        """Per row: (key, tokens, labels) with padding removed (CPU tensors)."""
        ids_c = torch.as_tensor(ids).detach().cpu()
        if ids_c.ndim == 1:
            ids_c = ids_c.unsqueeze(0)
        keep = torch.ones_like(ids_c, dtype=torch.bool) if attn is None else torch.as_tensor(attn).detach().cpu().reshape(ids_c.shape).bool()
        if labels is None:
            lab_c = torch.where(keep, ids_c, torch.full_like(ids_c, -100))
        else:
            lab_c = torch.as_tensor(labels).detach().cpu().reshape(ids_c.shape)
        out = []
        for b in range(ids_c.shape[0]):
            tok, lab = ids_c[b][keep[b]], lab_c[b][keep[b]]
            out.append((_example_key(tok, lab != -100), tok, lab))
        return out

    def _risk_example(self, tok: torch.Tensor, lab: torch.Tensor) -> RiskExample:
        from ...modeling import find_suffix_positions

        trained = (lab != -100).nonzero().flatten()
        first = int(trained[0]) if len(trained) else len(tok)
        if first == 0:  # every token trained (no prompt masking): split at the chat template's post-instruction tokens
            suffix = self._runtime.post_instruction_ids if self._runtime is not None else []
            start = int(find_suffix_positions(tok.unsqueeze(0), suffix)[0]) if suffix else -1
            first = start + len(suffix) if start >= 0 else len(tok)
        prompt, response = tok[:first].tolist(), tok[first:][lab[first:] != -100].tolist()
        if self.score_context is not None:
            prompt = self.score_context.to_template(prompt) or prompt
        ex = RiskExample(prompt, response)
        if self.estimator.needs_text:
            tokz = getattr(self._runtime, "tokenizer", None)
            if tokz is None:
                raise ConfigError(f"risk estimator '{self.estimator.name}' reads text: pass the tokenizer to the trainer")
            ex.prompt_text = tokz.decode(prompt, skip_special_tokens=True)
            ex.response_text = tokz.decode(response, skip_special_tokens=True)
        return ex

    def _find_context(self, rows) -> None:
        """With ``score_context: template``, once (from the first rows seen): the header the rows share, if any."""
        from ...modeling import shared_context

        if self._context_checked or self.config.score_context != "template":
            return
        tok = getattr(self._runtime, "tokenizer", None)
        if tok is None:
            return
        self._context_checked = True
        self.score_context, why = shared_context(tok, [t.tolist() for _, t, _ in rows])
        if self.score_context is not None:
            logger.info("safeguard: adaptive_kl: %s; risk is scored with the template's own header in its place "
                        "(score_context: template)", why)

    def _score(self, rows, batch_size: int = 16, progress: bool = False) -> int:
        todo = {}
        for key, tok, lab in rows:
            if key not in self._risk:
                todo.setdefault(key, (tok, lab))
        if not todo:
            return 0
        runtime = self._runtime
        if self.estimator.needs_reference and (runtime is None or not runtime.reference_available()):
            self._warn_once("missing", f"{len(todo)} example(s) seen only after the first full fine-tuning update "
                                       f"cannot be scored by '{self.estimator.name}' (it reads the original model); "
                                       f"using missing_risk={self.config.missing_risk}. Precompute before training.")
            for key in todo:
                self._risk[key] = self.config.missing_risk
            self.n_risk_missing += len(todo)
            return len(todo)
        ctx = RiskContext(model=getattr(runtime, "model", None), tokenizer=getattr(runtime, "tokenizer", None),
                          reference=runtime.reference if runtime is not None else RiskContext.reference,
                          batch_size=batch_size, progress=progress)
        examples = [self._risk_example(tok, lab) for tok, lab in todo.values()]
        scores = self.estimator.score(examples, ctx)
        if len(scores) != len(examples):
            raise SafeguardRuntimeError(f"risk estimator '{self.estimator.name}' returned {len(scores)} scores for {len(examples)} examples")
        for key, s in zip(todo, scores):
            if s is None or not math.isfinite(float(s)):
                self.n_risk_missing += 1
                s = self.config.missing_risk
            self._risk[key] = clamp_risk(s)
        return len(todo)

    def risk_of(self, rows) -> torch.Tensor:
        return torch.tensor([self._risk[k] for k, _, _ in rows], dtype=torch.float32)

    # -- precompute (before training)
    def precompute(self, ctx: TrainContext, batches: list[dict[str, Any]], batch_size: int = 16, progress: bool = True) -> int:
        self._bind(ctx.runtime)
        items: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}
        for b in batches:
            for key, tok, lab in self._rows(b["input_ids"], b.get("labels"), b.get("attention_mask")):
                items.setdefault(key, (tok, lab))
        rows = [(k, t, lab) for k, (t, lab) in items.items()]
        self._find_context(rows)
        n_new = self._score(rows, batch_size=batch_size, progress=progress)
        n_ref = 0
        if self._mode == "precomputed":
            _, w_kl = risk_weights(self.risk_of(rows), self.config.risk_floor, self.config.weight_bounds)
            need = [r for r, w in zip(rows, w_kl.tolist()) if w > 0 and r[0] not in self._ref]
            n_ref = self._precompute_reference(need, batch_size, progress)
        if rows:
            s = self.risk_of(rows)
            _, w_kl = risk_weights(s, self.config.risk_floor, self.config.weight_bounds)
            logger.info("safeguard: adaptive_kl: %d examples (%d newly scored by '%s'): mean risk %.2f, KL on %.0f%%, "
                        "reference %s%s", len(rows), n_new, self.estimator.name, float(s.mean()),
                        100 * float((w_kl > 0).float().mean()), self._mode,
                        f" ({n_ref} examples cached, top-{self.config.ref_top_k})" if self._mode == "precomputed" else "")
        return n_new

    def _chunk(self, vocab: int) -> int:
        return self.config.chunk_tokens or max(16, _CHUNK_ELEMENTS // max(1, vocab))

    @torch.no_grad()
    def _precompute_reference(self, rows, batch_size: int, progress: bool) -> int:
        from tqdm.auto import tqdm

        from ...distributed import gathered, param_shape
        from ...modeling import output_head, pad_right

        if not rows:
            return 0
        runtime = self._runtime
        head = output_head(runtime.model)
        vocab = param_shape(head.weight)[0]
        k = min(self.config.ref_top_k, vocab - 1)
        device = next(runtime.model.parameters()).device
        rows = sorted(rows, key=lambda r: len(r[1]))
        for s in tqdm(range(0, len(rows), batch_size), desc="safeguard: adaptive_kl reference log-probs", unit="batch",
                      disable=not progress):
            chunk = rows[s: s + batch_size]
            ids, mask = pad_right([r[1].tolist() for r in chunk], 0)
            labs = torch.full_like(ids, -100)
            for i, r in enumerate(chunk):
                labs[i, : len(r[2])] = r[2]
            tmask = torch.zeros_like(labs, dtype=torch.bool)
            tmask[:, :-1] = labs[:, 1:] != -100
            h = runtime.reference_hidden(ids.to(device), attention_mask=mask.to(device))
            sel = h[tmask.to(h.device)]
            idx_l, lp_l, lpT_l = [], [], []
            step = self._chunk(vocab)
            # ZeRO-3: the LM head is partitioned outside its own forward; gathered after the forward (collective: every
            # rank runs the same rows), since a forward re-partitions parameters gathered around it
            with gathered([head.weight, head.bias]):
                for c0 in range(0, sel.shape[0], step):
                    z = head.logits(sel[c0: c0 + step])
                    lse = torch.logsumexp(z, -1, keepdim=True)
                    top, idx = z.topk(k, -1)
                    idx_l.append(idx.to(torch.int32).cpu())
                    lp_l.append((top - lse).cpu())
                    lpT_l.append((torch.logsumexp(z.scatter(1, idx, float("-inf")), -1) - lse.squeeze(1)).cpu())
            idx_all, lp_all, lpT_all = torch.cat(idx_l), torch.cat(lp_l), torch.cat(lpT_l)
            counts = tmask.sum(1).tolist()
            off = 0
            for r, n in zip(chunk, counts):
                self._ref[r[0]] = (idx_all[off: off + n].clone(), lp_all[off: off + n].clone(), lpT_all[off: off + n].clone())
                off += n
        return len(rows)

    # -- training
    def penalty(self, batch: BatchView) -> torch.Tensor | None:
        if batch.hidden is None:
            return None
        if batch.labels is None and batch.forward_kwargs.get("shift_labels") is None:
            raise SafeguardRuntimeError("adaptive_kl needs the labels in the training forward (model(..., labels=...)); "
                                        "TRL's SFTTrainer and transformers' Trainer pass them")
        if batch.attention_mask is None and batch.forward_kwargs.get("position_ids") is not None:
            pos = batch.forward_kwargs["position_ids"]
            if bool((pos[:, 1:] == 0).any()):
                raise SafeguardRuntimeError("adaptive_kl needs one example per row: packing / padding-free batches "
                                            "are not supported (set packing=False, padding_free=False)")
        self._bind(batch.runtime)
        rows = self._rows(batch.input_ids, batch.labels, batch.attention_mask)
        self._score(rows)  # examples not seen in the pre-training pass (streaming data)
        s = self.risk_of(rows)
        w_sft, w_kl = risk_weights(s, self.config.risk_floor, self.config.weight_bounds)
        p = self._p
        p["rows"] += len(rows)
        p["risk"] += float(s.sum())
        p["w_kl"] += float(w_kl.sum())
        mask, targets = batch.next_token_targets()
        mask = mask.to(batch.hidden.device)
        targets = targets.to(batch.hidden.device)
        n_row = mask.sum(1).cpu()
        N = int(n_row.sum())
        a_row, c_row = w_sft - 1, w_kl.clone()
        if N == 0 or not bool(((a_row != 0) | (c_row != 0)).any()):
            return None
        head = batch.head
        chunk = self._chunk(head.weight.shape[0])
        ref_h = ref_idx = ref_lp = ref_lpT = None
        kl_rows = (c_row > 0) & (n_row > 0)
        if kl_rows.any() and self._mode == "precomputed":
            cached = []
            for b in kl_rows.nonzero().flatten().tolist():
                ref = self._ref.get(rows[b][0])
                if ref is None or ref[0].shape[0] != int(n_row[b]):
                    kl_rows[b] = False
                    self.n_ref_missing += 1
                    self._warn_once("ref", "no precomputed reference for some examples (first seen during training, "
                                           "after the original weights were overwritten): their KL term is dropped "
                                           "(counted in akl_ref_missing)")
                else:
                    cached.append(ref)
            if cached:
                dev = batch.hidden.device
                ref_idx, ref_lp, ref_lpT = (torch.cat([r[i] for r in cached]).to(dev) for i in range(3))
        elif kl_rows.any():  # live: adapter-disabled forward of the KL rows, up to their last response token
            rid, last = _live_rows(kl_rows, mask)
            ref_hidden = batch.reference_hidden(rid, length=last)  # usually run (and cached) by prefetch
            m_sub = mask[rid.to(mask.device)]
            ref_h = ref_hidden[m_sub[:, :last].to(ref_hidden.device)].to(batch.hidden.device)
            self.n_ref_forwards += 1
            p["ref"] += 1
        c_row = torch.where(kl_rows, c_row, torch.zeros_like(c_row))
        dev = batch.hidden.device
        # several ranks: N = global response tokens / world size, as the trainer's CE (num_items_in_batch × ranks)
        Nd = batch.tokens_denominator(N)
        coef_a = (a_row / Nd).to(dev).unsqueeze(1).expand_as(mask)
        coef_c = (c_row / Nd).to(dev).unsqueeze(1).expand_as(mask)
        kl_m = mask & kl_rows.to(dev).unsqueeze(1)
        ce_m = mask & ~kl_rows.to(dev).unsqueeze(1) & (a_row != 0).to(dev).unsqueeze(1)
        total = None
        for m, with_ref in ((kl_m, True), (ce_m, False)):
            n = int(m.sum())
            if n == 0:
                continue
            args = (ref_h, ref_idx, ref_lp, ref_lpT) if with_ref else (None, None, None, None)
            val, ce_sum, kl_sum = _HeadObjective.apply(batch.hidden[m], head.weight, head.bias, targets[m],
                                                       coef_a[m], coef_c[m], *args, head, chunk)
            p["ce"] += float(ce_sum)
            p["ce_n"] += n
            if with_ref:
                p["kl"] += float(kl_sum)
                p["kl_n"] += n
            total = val if total is None else total + val
        return total

    def prefetch(self, batch: BatchView) -> None:
        """Live reference: run the adapter-disabled forward of the KL rows before the engine gathers the LM head
        (under ZeRO-3 a forward re-partitions parameters gathered around it). Forwards are collective under ZeRO-3
        with several ranks, so there a rank whose micro-batch needs none runs a one-token one (result unused)."""
        if batch.hidden is None or (batch.labels is None and batch.forward_kwargs.get("shift_labels") is None):
            return
        self._bind(batch.runtime)
        if self._mode not in ("live", "precomputed"):
            return
        rows = self._rows(batch.input_ids, batch.labels, batch.attention_mask)
        self._find_context(rows)
        self._score(rows)
        w_sft, w_kl = risk_weights(self.risk_of(rows), self.config.risk_floor, self.config.weight_bounds)
        mask = batch.next_token_targets()[0]
        n_row = mask.sum(1).cpu()
        kl_rows = (w_kl > 0) & (n_row > 0)
        if self._mode == "precomputed":
            self._fill_reference(batch, rows, kl_rows)
            return
        if int(n_row.sum()) and bool(((w_sft != 1) | (w_kl != 0)).any()) and bool(kl_rows.any()):
            rid, last = _live_rows(kl_rows, mask)
            batch.reference_hidden(rid, length=last)
        elif batch.runtime is not None and batch.runtime.collective_forwards:
            batch.reference_hidden(torch.zeros(1, dtype=torch.long), length=1)

    def _fill_reference(self, batch: BatchView, rows, kl_rows: torch.Tensor) -> None:
        """Precomputed reference: top-k log-probs of KL rows first seen during training, computed now while the
        original weights are reachable (PEFT: always; full fine-tuning: before the first update). Not under ZeRO-3
        with several ranks (forwards are collective there): such rows drop their KL term in ``penalty``."""
        runtime = batch.runtime
        need = [rows[b] for b in kl_rows.nonzero().flatten().tolist() if rows[b][0] not in self._ref]
        if not need or runtime is None or runtime.collective_forwards or not runtime.reference_available():
            return
        self._precompute_reference(list({r[0]: r for r in need}.values()), batch_size=len(need), progress=False)
        self.n_ref_forwards += 1
        self._p["ref"] += 1

    # -- logging and state
    def metrics(self) -> dict[str, float]:
        p = self._p
        out = {"akl_judge_fallbacks": float(self.estimator.n_fallbacks), "akl_ref_forwards": float(p["ref"])}
        if p["rows"]:
            out["akl_risk_mean"] = p["risk"] / p["rows"]
            out["akl_w_kl_mean"] = p["w_kl"] / p["rows"]
        if p["ce_n"]:
            out["akl_ce"] = p["ce"] / p["ce_n"]
        if p["kl_n"]:
            out["akl_kl"] = p["kl"] / p["kl_n"]
        if self.n_risk_missing:
            out["akl_risk_missing"] = float(self.n_risk_missing)
        if self.n_ref_missing:
            out["akl_ref_missing"] = float(self.n_ref_missing)
        self._reset_period()
        return out

    def state_dict(self) -> dict[str, Any]:
        keys = list(self._risk)
        out: dict[str, Any] = {"risk_keys": [k.hex() for k in keys],
                               "risk": torch.tensor([self._risk[k] for k in keys], dtype=torch.float32),
                               "n_ref_forwards": self.n_ref_forwards}
        if self._ref:
            rk = list(self._ref)
            out["ref_keys"] = [k.hex() for k in rk]
            out["ref_counts"] = torch.tensor([self._ref[k][0].shape[0] for k in rk], dtype=torch.int64)
            for i, name in enumerate(("ref_idx", "ref_lp", "ref_lpT")):
                out[name] = torch.cat([self._ref[k][i] for k in rk])
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "risk_keys" in state:
            self._risk.update({bytes.fromhex(k): float(v) for k, v in zip(state["risk_keys"], state["risk"].tolist())})
        if "ref_keys" in state:
            counts = state["ref_counts"].tolist()
            parts = [torch.split(state[n], counts) for n in ("ref_idx", "ref_lp", "ref_lpT")]
            for j, k in enumerate(state["ref_keys"]):
                self._ref[bytes.fromhex(k)] = (parts[0][j], parts[1][j], parts[2][j])
        self.n_ref_forwards = int(state.get("n_ref_forwards", self.n_ref_forwards))

    # -- calibration
    @classmethod
    def calibrate(cls, ctx: CalibrationContext, artifact) -> None:
        """Calibrate every registered risk estimator that needs it (the built-in ``probe``: ``risk_probe``)."""
        for est in available_risk_estimators().values():
            est.calibrate(ctx, artifact)
