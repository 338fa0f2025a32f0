"""Step-time and peak-memory overhead of safeguard constraints vs plain SFT, measured in one run.

    python benchmarks/overhead.py --model smollm2-135m-instruct --steps 12 --repeats 2
    python benchmarks/overhead.py --model tiny --steps 20          # seconds, for a smoke check

Each variant trains in its own child process (so peak memory is per variant), variants alternate
(plain, constrained, plain, ...) so slow drift of the machine affects both alike. Step time = median over
steps after ``--skip`` warm-up steps; peak memory = the child's peak RSS (CPU) or
``torch.cuda.max_memory_allocated`` (GPU). The one-time reference precompute is reported separately.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {
    "plain": None,
    "procon": {"procon": {"weight": 100.0}},
    # adaptive KL with a reference forward on every batch (constant risk 5) and with every batch below the floor
    "akl_every_batch": {"adaptive_kl": {"risk": "constant", "risk_options": {"score": 5}}},
    "akl_below_floor": {"adaptive_kl": {"risk": "constant", "risk_options": {"score": 1}, "risk_floor": 2}},
    # ... and with top-k reference log-probs cached once before training instead of the per-batch forward
    "akl_precomputed": {"adaptive_kl": {"risk": "constant", "risk_options": {"score": 5}, "reference": "precomputed"}},
    # CWAC parts alone and coupled (post-step projection of every trained matrix; SAE term at the cached positions)
    "cwac_weight": {"cwac": {"sae_weight": 0.0}},
    "cwac_sae": {"cwac": {"projection": False}},
    "cwac": {"cwac": {}},
    # GuardSpace adapters (same rank as plain LoRA): A projected onto the null space after every optimizer step
    # (default), and the older per-forward projection of A
    "guardspace": {"guardspace": {"null_energy": 0.01}},
    "guardspace_forward": {"guardspace": {"null_energy": 0.01, "projection": "forward"}},
    # ... with massive-activation directions blocked outside the energy budget (needed on SmolLM2)
    "guardspace_massive": {"guardspace": {"null_energy": 0.01, "massive_share": 0.9}},
    # the anchor: one extra forward + backward of its prompts per micro-batch (reference answers decoded once)
    "anchor": {"anchor": {}},
    # the recommended preset as it ships (safeguard_plugin/presets.py)
    "recommended": {"preset": "recommended"},
    # ... without the anchor (ProCon + probe KL), and with 2 anchor prompts per micro-batch instead of 4
    "recommended_no_anchor": {"preset": "recommended", "anchor": {"enabled": False}},
    "recommended_anchor2": {"preset": "recommended", "anchor": {"batch_size": 2}},
}


def _load(spec):
    from safeguard_plugin.modeling import load_model_spec

    return load_model_spec(spec, hidden=256, layers=8)


def _rows(n: int, answer_words: int):
    from safeguard_plugin.bench.recipes import prompt_completion
    from safeguard_plugin.data import load_prompts

    prompts = load_prompts("harmless").all
    filler = " ".join(["The answer is explained step by step here."] * (answer_words // 8 + 1)).split()[:answer_words]
    return [prompt_completion(prompts[i % len(prompts)], " ".join(filler)) for i in range(n)]


def child(args) -> dict:
    import torch

    from safeguard_plugin.bench.recipes import sft

    torch.manual_seed(0)
    model, tok = _load(args.model)
    cfg = VARIANTS[args.child]
    if cfg is not None:
        cfg = {**cfg, "artifact": args.artifact}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    rows = _rows(args.batch_size * (args.steps + 1), args.answer_words)
    t0 = time.perf_counter()
    res = sft(model, tok, rows, steps=args.steps, output_dir=tempfile.mkdtemp(), batch_size=args.batch_size,
              lora_r=None if args.full else args.lora_r, safeguard=cfg, logging_steps=max(1, args.steps))
    total = time.perf_counter() - t0
    times = res.step_times[args.skip:]
    peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"variant": args.child, "step_median_s": statistics.median(times), "step_times": times,
            "train_total_s": total, "outside_steps_s": total - sum(res.step_times), "peak_bytes": peak}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--skip", type=int, default=2, help="warm-up steps excluded from the median")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--answer-words", type=int, default=48)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--variants", default="procon", help=f"comma-separated, from: {', '.join(VARIANTS)}")
    p.add_argument("--artifact", help="existing artifact (default: calibrate one with 64+64 prompts)")
    p.add_argument("--out", default="results/overhead.json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)))
        return 0

    if not args.artifact:
        from safeguard_plugin.calibration import calibrate
        from safeguard_plugin.data import load_prompts

        model, tok = _load(args.model)
        args.artifact = str(Path(tempfile.mkdtemp()) / "artifact")
        from safeguard_plugin.presets import apply_preset

        names = sorted({n for v in args.variants.split(",") for n in apply_preset(VARIANTS[v] or {}) if n != "preset"})
        # one artifact serves every variant: GuardSpace is calibrated with massive_share when a variant sets it (its
        # range basis then covers the variants without it too)
        cal_cfg = {n: sec for v in args.variants.split(",") for n, sec in (VARIANTS[v] or {}).items()
                   if n == "guardspace" and sec.get("massive_share") is not None}
        # GuardSpace needs more harmful tokens than the widest layer input (else its null space is ~everything)
        lim = 128 if "guardspace" in names else 64
        calibrate(model, tok, load_prompts("harmful", limit=lim), load_prompts("harmless", limit=lim), args.artifact,
                  model_id=args.model, constraints=names, progress=True, constraint_configs=cal_cfg)
        del model
    order = ["plain"] + args.variants.split(",")
    runs: dict[str, list[dict]] = {v: [] for v in order}
    failed: set[str] = set()
    for rep in range(args.repeats):
        # reversed every other repeat: a machine that speeds up or slows down during the run favours no variant
        for v in (order if rep % 2 == 0 else order[::-1]):
            if v in failed:
                continue
            cmd = [sys.executable, __file__, "--child", v, "--model", args.model, "--steps", str(args.steps),
                   "--skip", str(args.skip), "--batch-size", str(args.batch_size), "--answer-words",
                   str(args.answer_words), "--lora-r", str(args.lora_r), "--artifact", args.artifact]
            cmd += ["--full"] if args.full else []
            print(f"[repeat {rep + 1}/{args.repeats}] {v} ...", flush=True)
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if out.returncode != 0 or line is None:
                sys.stderr.write(out.stdout[-3000:] + out.stderr[-3000:])
                if v == "plain":
                    raise SystemExit("the plain baseline failed")
                print(f"variant {v} failed (error above); the other variants go on", flush=True)
                failed.add(v)
                continue
            runs[v].append(json.loads(line[len("RESULT "):]))
    base_t = statistics.median(r["step_median_s"] for r in runs["plain"])
    base_m = max(r["peak_bytes"] for r in runs["plain"])
    table = ["| variant | step s (median) | time ratio | peak MiB | memory ratio | one-time s outside steps |",
             "|---|---|---|---|---|---|"]
    summary = {}
    for v in order:
        if v in failed:
            table.append(f"| {v} | failed | – | – | – | – |")
            continue
        t = statistics.median(r["step_median_s"] for r in runs[v])
        m = max(r["peak_bytes"] for r in runs[v])
        o = statistics.median(r["outside_steps_s"] for r in runs[v])
        summary[v] = {"step_s": t, "time_ratio": t / base_t, "peak_bytes": m, "memory_ratio": m / base_m, "outside_steps_s": o}
        table.append(f"| {v} | {t:.3f} | {t / base_t:.3f} | {m / 2**20:.0f} | {m / base_m:.3f} | {o:.1f} |")
    mode = "full FT" if args.full else f"LoRA r={args.lora_r}"
    header = (f"model {args.model}, {mode}, batch {args.batch_size}, {args.steps} steps (median after {args.skip}), "
              f"{args.repeats} alternating repeats, device {'cuda' if os.environ.get('CUDA_VISIBLE_DEVICES') else 'cpu'}")
    print(header + "\n" + "\n".join(table))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"config": vars(args), "summary": summary, "runs": runs,
                                          "failed": sorted(failed)}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
