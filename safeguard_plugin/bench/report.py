"""Markdown report and PNG plots for ``safeguard bench`` results."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pct(x):
    return "–" if x is None else f"{100 * x:.1f}"


def _ratio(x):
    return "–" if x is None else f"{x:.2f}×"


def results_table(runs: list[dict]) -> str:
    lines = ["| method | p | harmful refusal % ↑ | refusal score | borderline refusal % ↓ | harmless refusal % ↓ | "
             "task acc % ↑ | collapse % ↓ | train loss | step-time ratio | train-memory ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        m = r["metrics"]
        loss = r.get("train_loss_final")
        lines.append(
            f"| {r['method']} | {r['ratio']:g} | {_pct(m['harmful_refusal'])} | {m['harmful_score']:+.2f} | "
            f"{_pct(m['borderline_refusal'])} | {_pct(m['harmless_refusal'])} | {_pct(m['task_accuracy'])} | "
            f"{_pct(m['collapse_rate'])} | {'–' if loss is None else f'{loss:.3f}'} | {_ratio(r.get('time_ratio'))} | "
            f"{_ratio(r.get('memory_ratio'))} |")
    return "\n".join(lines)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _label(run: dict) -> str:
    return f"{run['method']} p={run['ratio']:g}"


def _over_steps(path: Path, lines: list, panels: list[tuple[str, str | None, bool]], marker: str | None = None) -> Path:
    """One figure, a panel per ``(title, y label, symlog)``; ``lines``: ``(label, steps, [ys per panel or None])``."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(10, 4))
    for label, steps, series in lines:
        for ax, ys in zip(axes, series):
            if ys is not None:
                ax.plot(steps, ys, marker=marker, label=label)
    for ax, (title, ylabel, symlog) in zip(axes, panels):
        ax.set_title(title)
        if ylabel:
            ax.set_ylabel(ylabel)
        if symlog:
            ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_all(results: dict[str, Any], full_runs: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    runs = results["runs"]
    # 1. refusal vs task accuracy
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for r in runs:
        m = r["metrics"]
        ax.scatter(100 * m["task_accuracy"], 100 * m["harmful_refusal"], s=60)
        ax.annotate(f"{r['method']} (p={r['ratio']:g})", (100 * m["task_accuracy"], 100 * m["harmful_refusal"]),
                    textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("task accuracy (%)")
    ax.set_ylabel("harmful-prompt refusal (%)")
    ax.set_title("Safety vs utility (up and right is better)")
    ax.grid(alpha=0.3)
    files.append(_save(fig, out / "refusal_vs_accuracy.png"))
    # 2. refusal vs harmful ratio
    methods = sorted({r["method"] for r in runs if r["method"] != "base"})
    ratios = sorted({r["ratio"] for r in runs if r["method"] != "base"})
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for meth in methods:
        pts = sorted((r["ratio"], r["metrics"]["harmful_refusal"]) for r in runs if r["method"] == meth)
        ax.plot([100 * x for x, _ in pts], [100 * y for _, y in pts], marker="o", label=meth)
    base = [r for r in runs if r["method"] == "base"]
    if base:
        ax.axhline(100 * base[0]["metrics"]["harmful_refusal"], color="gray", ls="--", label="base (no fine-tuning)")
    ax.set_xlabel("harmful examples in fine-tuning data (%)")
    ax.set_ylabel("harmful-prompt refusal (%)")
    ax.set_title("Refusal vs harmful ratio" + (" (single ratio in this profile)" if len(ratios) < 2 else ""))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    files.append(_save(fig, out / "refusal_vs_ratio.png"))
    # 3. penalty and drift over steps
    constrained = [r for r in full_runs if r.get("log_history") and any(
        k.startswith("safeguard/") for h in r["log_history"] for k in h)]
    if constrained:
        lines = []
        for r in constrained:
            hist = [h for h in r["log_history"] if "loss" in h]
            series = []
            for key in ("safeguard/penalty", "safeguard/procon_drift"):
                ys = [h.get(key) for h in hist]
                series.append([float("nan") if y is None else y for y in ys] if any(y is not None for y in ys) else None)
            lines.append((_label(r), [h["step"] for h in hist], series))
        files.append(_over_steps(out / "penalty_drift.png", lines, [
            ("penalty per step", None, True), ("refusal-projection drift (std units)", None, False)]))
    # 4. the live monitor's held-out safety measurements over training, every trained method (plain SFT included)
    monitored = [r for r in full_runs if any("safeguard/monitor_score_drop" in h for h in r.get("log_history") or [])]
    if monitored:
        lines = []
        for r in monitored:
            hist = [h for h in r["log_history"] if "safeguard/monitor_score_drop" in h]
            lines.append((_label(r), [0] + [h["step"] for h in hist],
                          [[0.0] + [-h["safeguard/monitor_score_drop"] for h in hist],
                           [0.0] + [h["safeguard/monitor_projection_shift"] for h in hist]]))
        files.append(_over_steps(out / "safety_during_training.png", lines, [
            ("held-out harmful refusal score, change from step 0", "Δ refusal log-odds (↓ = less refusal)", False),
            ("harmful prompts' projection on r, change from step 0", "std units", False)], marker="o"))
    return files


def write_report(results: dict[str, Any], full_runs: list[dict], out: str | Path) -> str:
    out = Path(out)
    prof = results["profile"]
    judge = results.get("judge") or {}
    plots = plot_all(results, full_runs, out)
    md = [
        f"# safeguard bench — {results['model']}, profile `{prof['name']}`", "",
        f"*{prof['description']}*", "",
        f"Fine-tuning: {prof['n_train']} examples (benign arithmetic word problems + harmful prompts with content-free "
        f"compliance-style answers at ratio p), LoRA r={prof['lora_r']}, {prof['steps']} steps, batch {prof['batch_size']}, "
        f"lr {prof['lr']}. Evaluation: held-out harmful prompts (refusal ↑), borderline-but-safe prompts (over-refusal ↓), "
        f"harmless prompts, arithmetic task accuracy (exact match), greedy decoding, {prof['max_new_tokens']} new tokens.", "",
        results_table(results["runs"]), "",
        "Step-time and memory ratios are relative to plain SFT at the same p (median step time; memory = CUDA peak "
        "allocation on GPU, '–' on CPU where in-process RSS is not comparable between runs). Each row trains once, "
        "one after another, so a machine whose speed drifts (measured here on CPU: up to ~30% within minutes) "
        "moves these ratios; for cost figures use `benchmarks/overhead.py` (one process per variant, repeats in "
        "alternating order). Collapse % = responses to harmless/task prompts that contain the attack's compliance "
        "template.", "",
    ]
    if judge:
        md += [f"Refusal judge (keyword) validated on {judge.get('n')} labelled responses "
               f"({judge.get('source', 'pyrit refusal scorer set')}): accuracy {100 * judge['accuracy']:.1f}%, "
               f"precision {100 * judge['precision']:.1f}%, recall {100 * judge['recall']:.1f}%.", ""]
    if prof.get("monitor_every"):
        md += [f"Every trained run had the live safety monitor on (`monitor: {{every_n_steps: {prof['monitor_every']}, "
               f"n_prompts: {prof.get('monitor_prompts')}, action: warn}}`; it measures, adds no loss term and changes "
               "no weight), so `safety_during_training.png` shows the same held-out measurement for plain SFT and "
               f"each method. Its checks run inside the timed steps (one step in {prof['monitor_every']}), which the "
               "median step time mostly ignores.", ""]
    md += [f"![{p.stem}]({p.name})" for p in plots]
    reused = results.get("reused_runs") or 0
    md += ["", f"Wall time: {results['wall_seconds'] / 60:.1f} min" + (
        f" (this invocation; {reused} run(s) finished by an earlier invocation were reused, not timed)." if reused
        else ".")]
    text = "\n".join(md) + "\n"
    (out / "report.md").write_text(text)
    return text
