"""GuardSpace vs plain LoRA optimizer-step time at the same rank, targets and alpha, interleaved in one process.

    python benchmarks/guardspace_step_time.py                      # tiny random model, calibrated here
    python benchmarks/guardspace_step_time.py --model qwen2.5-coder-0.5b-instruct --artifact <dir> --rank 16 --steps 4 --repeats 2

Prints a JSON object: median step time of each variant (plain LoRA, GuardSpace with the per-step projector, GuardSpace
with the per-forward projector), their ratios to plain LoRA and the per-round (paired) median ratios.
"""

from __future__ import annotations

import json
import time
from typing import Any

import torch
from torch import nn

from safeguard_plugin.constraints.guardspace import GuardSpace, GuardSpaceConfig, calibrate_guardspace


def benchmark_step_time(hidden: int = 256, layers: int = 4, rank: int = 8, batch: int = 8, seq: int = 128,
                        steps: int = 20, repeats: int = 3, null_energy: float = 0.01, threads: int | None = None,
                        seed: int = 0, model: str | None = None, artifact: str | None = None,
                        massive_share: float | None = None) -> dict[str, float]:
    """Median optimizer-step time (forward + backward + AdamW) of plain PEFT LoRA vs GuardSpace at the same rank,
    targets and alpha, with the projector per optimizer step ('step', the callback's default) and per forward
    ('forward'). All three models live in one process and take their steps in turn (the order rotates every step),
    so a slow phase of the machine hits all of them alike. ``model``: a model spec (``load_model_spec``) with its
    GuardSpace ``artifact`` folder; default: a tiny random model calibrated here. ``steps * repeats`` timed steps
    each, after 2 warm-up steps."""
    import statistics

    from peft import LoraConfig, inject_adapter_in_model

    from safeguard_plugin.artifacts import Artifact
    from safeguard_plugin.data import load_prompts
    from safeguard_plugin.modeling import load_model_spec

    prev = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        def fresh():
            return load_model_spec(model or "tiny", hidden=hidden, layers=layers)

        base, tok = fresh()
        if artifact is None:
            art = calibrate_guardspace(base, tok, load_prompts("harmful").train[:8],
                                       config={"null_energy": null_energy, "calibration": {"calibration_rank": rank},
                                               "massive_share": massive_share}, progress=False, check=False)
            extra = {"min_null_dim": 1, "max_null_fraction": 1.0}
        else:
            art, extra = Artifact.load(artifact), {}
        vocab = base.config.vocab_size
        models: dict[str, nn.Module] = {}
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]), base)
        for n, p in base.named_parameters():
            p.requires_grad_("lora_" in n)
        models["lora"] = base
        for proj in ("step", "forward"):
            m = fresh()[0]
            gs = GuardSpace(GuardSpaceConfig(rank=rank, null_energy=null_energy, massive_share=massive_share,
                                             projection=proj, **extra), art)
            gs.validate_model(m)
            gs.modify_model(m)  # 'step' in a bare loop: the version check projects A after each update
            models[f"guardspace_{proj}"] = m
        data = torch.randint(3, min(vocab, 32000), (batch, seq), generator=torch.Generator().manual_seed(seed))
        opts = {k: torch.optim.AdamW([p for p in v.parameters() if p.requires_grad], lr=1e-4) for k, v in models.items()}
        times: dict[str, list[float]] = {k: [] for k in models}
        kinds = list(models)
        for i in range(2 + steps * repeats):
            order = kinds[i % len(kinds):] + kinds[: i % len(kinds)]
            for kind in order:
                mdl, opt = models[kind], opts[kind]
                mdl.train()
                t = time.perf_counter()
                mdl(input_ids=data, labels=data).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if i >= 2:
                    times[kind].append(time.perf_counter() - t)
        out: dict[str, Any] = {f"{k}_median_s": statistics.median(v) for k, v in times.items()}
        for k in kinds[1:]:
            out[f"{k}_ratio"] = out[f"{k}_median_s"] / out["lora_median_s"]
            # per-round ratios (the same round of the rotation): their median is robust to slow phases
            out[f"{k}_paired_ratio"] = statistics.median(a / b for a, b in zip(times[k], times["lora"]))
        out.update(model=model or f"tiny(hidden={hidden}, layers={layers})", rank=rank, batch=batch, seq=seq,
                   steps=steps * repeats, threads=torch.get_num_threads())
        return out
    finally:
        torch.set_num_threads(prev)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="GuardSpace vs plain LoRA step time (same rank), interleaved steps")
    for name, default in (("hidden", 256), ("layers", 4), ("rank", 8), ("batch", 8), ("seq", 128), ("steps", 20),
                          ("repeats", 3), ("threads", 0)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--null-energy", type=float, default=0.01)
    ap.add_argument("--massive-share", type=float, default=None)
    ap.add_argument("--model", default=None, help="model spec (default: a tiny random model)")
    ap.add_argument("--artifact", default=None, help="GuardSpace artifact for --model (default: calibrate here)")
    a = ap.parse_args()
    print(json.dumps(benchmark_step_time(a.hidden, a.layers, a.rank, a.batch, a.seq, a.steps, a.repeats,
                                         a.null_energy, a.threads or None, model=a.model, artifact=a.artifact,
                                         massive_share=a.massive_share), indent=2))
