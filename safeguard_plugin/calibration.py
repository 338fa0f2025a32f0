"""Offline calibration: activations on harmful vs harmless prompts -> artifact components.

``refusal_direction`` (used by ProCon, the drift monitor and others):

* r[l, p] = mean_harmful h[l, p] - mean_harmless h[l, p], for every decoder layer l and every
  post-instruction position p (the chat-template tokens after the user's text), from the *train* split;
  stored unit-norm, with the raw norm.
* Selection rule (measured, not guessed): on the *held-out* split, separation[l, p] =
  (mean proj_harmful - mean proj_harmless) / pooled std of the projections. Candidate layers exclude
  layer 0 and the last 20% of layers (Arditi et al. discard late layers). The position is the one with the
  highest separation; the constrained layers are the candidates whose separation at that position is
  at least ``select_frac`` (default 0.5) of the best one.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .artifacts import Artifact, sha256_text
from .constraints.base import CalibrationContext  # the context constraints calibrate with (re-exported here)
from .data import PromptSet
from .errors import ConfigError
from .modeling import (
    capture_layers,
    find_decoder_layers,
    pad_right,
    post_instruction_ids,
    run_until,
    tokenize_prompts,
)

logger = logging.getLogger("safeguard_plugin")


@torch.no_grad()
def post_instruction_activations(ctx: CalibrationContext, prompts: list[str], desc: str) -> torch.Tensor:
    """Decoder-layer outputs at the post-instruction positions: ``(N, L, P, d)`` float32."""
    model, tok = ctx.model, ctx.tokenizer
    suffix = post_instruction_ids(tok)
    P = len(suffix)
    L = len(find_decoder_layers(model))
    seqs = tokenize_prompts(tok, prompts)
    for s in seqs:
        if s[-P:] != suffix:
            raise ConfigError("a rendered prompt does not end with the post-instruction tokens; chat template issue")
    device = next(model.parameters()).device
    out = []
    was_training = model.training
    model.eval()
    try:
        rng = range(0, len(seqs), ctx.batch_size)
        for s in tqdm(rng, desc=desc, unit="batch", disable=not ctx.progress):
            chunk = seqs[s: s + ctx.batch_size]
            ids, mask = pad_right(chunk, tok.pad_token_id or 0)
            with capture_layers(model, list(range(L))) as store:
                run_until(model, input_ids=ids.to(device), attention_mask=mask.to(device))
            pos = (mask.sum(1) - P).unsqueeze(1) + torch.arange(P)
            per_layer = []
            for layer in range(L):
                a = store[layer]
                idx = pos.to(a.device).unsqueeze(-1).expand(-1, -1, a.shape[-1])
                per_layer.append(a.gather(1, idx).float().cpu())
            out.append(torch.stack(per_layer, 1))
    finally:
        model.train(was_training)
    return torch.cat(out, 0)


def refusal_direction(ctx: CalibrationContext, artifact: Artifact) -> None:
    """Add the ``refusal_direction`` component (idempotent)."""
    if artifact.has("refusal_direction"):
        return
    harm_tr = post_instruction_activations(ctx, ctx.harmful.train, "calibrate: harmful (train)")
    safe_tr = post_instruction_activations(ctx, ctx.harmless.train, "calibrate: harmless (train)")
    harm_ho = post_instruction_activations(ctx, ctx.harmful.heldout, "calibrate: harmful (held-out)")
    safe_ho = post_instruction_activations(ctx, ctx.harmless.heldout, "calibrate: harmless (held-out)")
    raw = harm_tr.mean(0) - safe_tr.mean(0)  # (L, P, d)
    norms = raw.norm(dim=-1)
    r = raw / norms.clamp(min=1e-8).unsqueeze(-1)

    def proj(x):  # (N, L, P)
        return torch.einsum("nlpd,lpd->nlp", x, r)

    ph, ps = proj(harm_ho), proj(safe_ho)
    pooled = ((ph.var(0) + ps.var(0)) / 2).sqrt().clamp(min=1e-6)
    separation = (ph.mean(0) - ps.mean(0)) / pooled  # (L, P)
    # projection scale for penalties: pooled std over all calibration prompts (train split)
    pt = torch.cat([proj(harm_tr), proj(safe_tr)], 0)
    std = pt.std(0).clamp(min=1e-6)
    L, P = separation.shape
    hi = max(2, int(L * (1 - ctx.late_layer_cut)))
    lo = 1 if L > 2 else 0
    cand = list(range(lo, hi))
    best_p = int(separation[cand].max(0).values.argmax())
    best = float(separation[cand, best_p].max())
    selected = [layer for layer in cand if float(separation[layer, best_p]) >= ctx.select_frac * best]
    suffix = post_instruction_ids(ctx.tokenizer)
    artifact.manifest["tokenizer"]["post_instruction_ids"] = suffix
    artifact.manifest["tokenizer"]["post_instruction_text"] = ctx.tokenizer.decode(suffix)
    artifact.add_component(
        "refusal_direction",
        {
            "direction": r,
            "norm": norms,
            "std": std,
            "separation": separation,
            "mean_harmful": proj(harm_tr).mean(0),
            "mean_harmless": proj(safe_tr).mean(0),
        },
        {
            "num_layers": L,
            "num_positions": P,
            "hidden_size": int(r.shape[-1]),
            "offsets": list(range(-P, 0)),
            "selected_position": best_p,
            "selected_layers": selected,
            "selection_rule": f"layers {lo}..{hi - 1}, position argmax held-out separation, "
                              f"separation >= {ctx.select_frac} x best ({best:.2f})",
            "separation_at_selected_position": [round(float(x), 3) for x in separation[:, best_p]],
        },
    )
    logger.info("refusal direction: best held-out separation %.2f at position %d; layers %s", best, best_p, selected)


def data_record(harmful: PromptSet, harmless: PromptSet) -> dict:
    return {name: {"source": ps.source, "sha256": sha256_text(ps.train + ps.heldout), "n_train": len(ps.train),
                   "n_heldout": len(ps.heldout)} for name, ps in (("harmful", harmful), ("harmless", harmless))}


def resolve_targets(constraints: list[str] | str | None) -> list[str]:
    """Constraint names to calibrate for: ``"all"`` = every registered one; None or empty = the refusal direction
    alone (what ``procon`` and ``monitor`` use)."""
    from .registry import available_constraints

    registry = available_constraints()
    if constraints == "all":
        return list(registry)
    names = [constraints] if isinstance(constraints, str) else list(constraints or ["procon"])
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise ConfigError(f"unknown constraint '{unknown[0]}'; registered: {', '.join(registry)}")
    return list(dict.fromkeys(names))


def _existing(out_dir: Path, model, data: dict) -> Artifact | None:
    """The artifact already in ``out_dir`` when it was made for this model on the same prompts (its components are
    reused); None when there is none. Raises when it was made for another model or other prompts."""
    from .artifacts import MANIFEST, ArtifactError, compare_fingerprints, model_fingerprint

    if not (out_dir / MANIFEST).is_file():
        return None
    art = Artifact.load(out_dir)
    problems = compare_fingerprints(art.manifest["model"]["fingerprint"], model_fingerprint(model))
    if problems:
        raise ArtifactError(f"{out_dir} holds an artifact for another model ({problems[0]}); {_ELSEWHERE}")
    old = {k: (v or {}).get("sha256") for k, v in art.manifest.get("data", {}).items()}
    new = {k: v["sha256"] for k, v in data.items()}
    if old != new:
        raise ArtifactError(f"{out_dir} was calibrated on other prompts (data sha256 {old} vs {new}); use the same "
                            f"--harmful/--harmless/--limit, or {_ELSEWHERE}")
    return art


# the two ways out, for the command line and for an Axolotl YAML (whose calibration has no --recompute)
_ELSEWHERE = ("write it to another folder (`safeguard calibrate --out`; `safeguard.artifact:` in an Axolotl YAML), or "
              "replace it (`safeguard calibrate --recompute`; under Axolotl, delete the folder and it is recalibrated)")


def _seconds_per_batch(ctx: CalibrationContext) -> float:
    """One timed forward of a calibration batch (for the plan's estimate)."""
    import time

    seqs = tokenize_prompts(ctx.tokenizer, ctx.harmful.train[: ctx.batch_size])
    ids, mask = pad_right(seqs, ctx.tokenizer.pad_token_id or 0)
    device = next(ctx.model.parameters()).device
    with torch.no_grad():
        t0 = time.perf_counter()
        run_until(ctx.model, input_ids=ids.to(device), attention_mask=mask.to(device))
        return time.perf_counter() - t0


def calibrate(model, tokenizer, harmful: PromptSet, harmless: PromptSet, out_dir: str | Path, model_id: str,
              constraints: list[str] | str | None = None, batch_size: int = 16, progress: bool = True,
              base_model=None, constraint_configs: dict | None = None, recompute: bool = False) -> Artifact:
    """Calibrate what ``constraints`` need (see :func:`resolve_targets`) and write the artifact atomically.

    When ``out_dir`` already holds an artifact of this model made on the same prompts, the constraints it was
    calibrated for are reused and only the missing ones are computed and added (``recompute=True`` starts afresh).
    The plan, with a time estimate, is logged before any work starts.
    """
    from .registry import available_constraints

    registry = available_constraints()
    names = resolve_targets(constraints)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    data = data_record(harmful, harmless)
    out = Path(out_dir)
    artifact = None if recompute else _existing(out, model, data)
    done = list(artifact.manifest.get("calibrated_for", [])) if artifact is not None else []
    if artifact is None:
        artifact = Artifact.new(model, tokenizer, model_id)
        artifact.manifest["data"] = data
    todo = [n for n in names if n not in done]
    reused = [n for n in names if n in done]
    if reused:
        logger.info("calibration plan: reusing %s from %s (pass --recompute to redo them with new options)",
                    ", ".join(reused), out)
    if not todo:
        logger.info("calibration plan: nothing to compute, %s already holds everything for %s", out, ", ".join(names))
        return artifact
    ctx = CalibrationContext(model, tokenizer, harmful, harmless, batch_size=batch_size, progress=progress,
                             base_model=base_model, constraint_configs=dict(constraint_configs or {}))
    n_prompts = sum(len(ps.train) + len(ps.heldout) for ps in (harmful, harmless))
    per_batch = _seconds_per_batch(ctx)
    notes = [f"{n}: {registry[n].calibration_note}" for n in todo if registry[n].calibration_note]
    logger.info("calibration plan: compute %s on %d prompts; the forward passes alone take about %.0f s here "
                "(%.2f s per batch of %d)%s", ", ".join(todo), n_prompts, per_batch * -(-n_prompts // batch_size),
                per_batch, batch_size, "; " + "; ".join(notes) if notes else "")
    for n in todo:
        registry[n].calibrate(ctx, artifact)
    artifact.manifest["calibrated_for"] = done + todo
    artifact.save(out_dir)
    return artifact
