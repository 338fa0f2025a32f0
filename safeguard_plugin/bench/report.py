"""Markdown report and PNG plots for ``safeguard bench`` results."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pct(x):
    return "–" if x is None else f"{100 * x:.1f}"


def _ratio(x):
    return "–" if x is None else f"{x:.2f}×"


def _kind(run: dict, name: str) -> str | None:
    s = (run.get("sets") or {}).get(name)
    if s is not None:
        return s.get("kind")
    from ..eval import set_kind

    return set_kind(name)


def eval_sets_of(runs: list[dict]) -> list[tuple[str, str | None]]:
    """``(set name, kind)`` of every evaluation set in ``runs`` (first-seen order; harmful sets first): from each
    run's ``sets`` record, or, for results without one, from its ``<set>_refusal`` metrics."""
    names: dict[str, str | None] = {}
    derived = {"harmful_refusal_mean"}
    for r in runs:
        sets = r.get("sets")
        if sets:
            for n in sets:
                names.setdefault(n, _kind(r, n))
        else:
            for k in r.get("metrics") or {}:
                if k.endswith("_refusal") and k not in derived:
                    n = k[: -len("_refusal")]
                    names.setdefault(n, _kind(r, n))
    order = {"harmful": 0, "over_refusal": 1}
    return sorted(names.items(), key=lambda kv: order.get(kv[1], 2))


def harmful_refusal(run: dict) -> float | None:
    """Mean refusal over the run's harmful sets (``harmful_refusal`` for results written before sets were generic)."""
    m = run.get("metrics") or {}
    return m.get("harmful_refusal_mean", m.get("harmful_refusal"))


def results_table(runs: list[dict]) -> str:
    """One Markdown table (methods as rows): refusal on every harmful set ↑ and every over-refusal set ↓, task
    accuracy, collapse, a judge-agreement column when runs carry ``judge_agreement``, train loss, ratios vs SFT."""
    sets = eval_sets_of(runs)
    judge = any((r.get("metrics") or {}).get("judge_agreement") is not None for r in runs)
    arrow = {"harmful": " ↑", "over_refusal": " ↓"}
    head = ["method", "p"] + [f"{n} refusal %{arrow.get(k, '')}" for n, k in sets] + [
        "harmful score", "task acc % ↑", "collapse % ↓"] + (["judge agreement %"] if judge else []) + [
        "train loss", "step-time ratio", "train-memory ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for r in runs:
        m = r.get("metrics") or {}
        if r.get("status") == "not_applicable":
            notes.append(f"{r['method']}: {r.get('reason')}")
            cells = [r["method"], f"{r['ratio']:g}", f"not applicable ({len(notes)})"] + ["–"] * (len(head) - 3)
            lines.append("| " + " | ".join(cells) + " |")
            continue
        loss = r.get("train_loss_final")
        score = m.get("harmful_score_mean", m.get("harmful_score"))
        cells = [r["method"], f"{r['ratio']:g}"] + [_pct(m.get(f"{n}_refusal")) for n, _ in sets] + [
            "–" if score is None else f"{score:+.2f}", _pct(m.get("task_accuracy")), _pct(m.get("collapse_rate"))]
        if judge:
            cells.append(_pct(m.get("judge_agreement")))
        cells += ["–" if loss is None else f"{loss:.3f}", _ratio(r.get("time_ratio")), _ratio(r.get("memory_ratio"))]
        lines.append("| " + " | ".join(cells) + " |")
    if notes:
        lines += [""] + [f"({i}) not applicable: {n}" for i, n in enumerate(notes, 1)]
    return "\n".join(lines).rstrip("\n")


def runs_of_attack(runs: list[dict], attack: str) -> list[dict]:
    """The rows of one attack's table: its base (evaluated under its system prompt when it has one, else the plain
    base) and every run of the attack."""
    own_base = [r for r in runs if r["method"] == "base" and r.get("attack") == attack]
    base = own_base or [r for r in runs if r["method"] == "base" and r.get("attack") is None]
    return base + [r for r in runs if r["method"] != "base" and r.get("attack") == attack]


def attacks_of(runs: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["attack"] for r in runs if r["method"] != "base" and r.get("attack")))


def strength_table(runs: list[dict]) -> str:
    """Per attack: base vs plain SFT harmful refusal (mean over harmful sets) and the relative drop -- each attack's
    plain-SFT row should show a real drop (>= 50% relative) for the attack to test anything."""
    lines = ["| attack | p | base harmful refusal % | plain SFT harmful refusal % | relative drop | >= 50%? |",
             "|---|---|---|---|---|---|"]
    for a in attacks_of(runs):
        rows = runs_of_attack(runs, a)
        base = next((harmful_refusal(r) for r in rows if r["method"] == "base"), None)
        for r in rows:
            if r["method"] != "sft" or r.get("status") == "not_applicable":
                continue
            sft = harmful_refusal(r)
            drop = (base - sft) / base if base and sft is not None else None
            ok = "–" if drop is None else ("yes" if drop >= 0.5 else "**no**")
            lines.append(f"| {a} | {r['ratio']:g} | {_pct(base)} | {_pct(sft)} | "
                         f"{'–' if drop is None else f'{100 * drop:.0f}%'} | {ok} |")
    return "\n".join(lines)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _label(run: dict) -> str:
    where = f"{run['attack']} " if run.get("attack") else ""
    return f"{run['method']} ({where}p={run['ratio']:g})"


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


def _strength(run: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in run["sweep"]["params"].items())


def plot_pareto(runs: list[dict], path: Path) -> Path | None:
    """``pareto.png``: harmful refusal (mean over harmful sets) vs task accuracy, one panel per attack, one line per
    swept method through its sweep points (labelled by strength), every other method a single point, base and plain
    SFT as reference markers. None when no run is a sweep point."""
    import matplotlib.pyplot as plt

    if not any(r.get("sweep") for r in runs):
        return None
    attacks = [a for a in attacks_of(runs) if any(r.get("sweep") for r in runs if r.get("attack") == a)]
    fig, axes = plt.subplots(1, len(attacks), figsize=(6.5 * len(attacks), 5), squeeze=False)
    for ax, attack in zip(axes[0], attacks):
        rows = [r for r in runs_of_attack(runs, attack) if r.get("status") != "not_applicable"
                and harmful_refusal(r) is not None]
        groups: dict[str, list[dict]] = {}
        for r in rows:
            if r.get("sweep"):
                groups.setdefault(r["sweep"]["constraint"], []).append(r)
        for name, pts in groups.items():
            xs = [100 * p["metrics"]["task_accuracy"] for p in pts]
            ys = [100 * harmful_refusal(p) for p in pts]
            ax.plot(xs, ys, marker="o", label=f"{name} (sweep)")
            for p, x, y in zip(pts, xs, ys):
                ax.annotate(_strength(p), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        for r in rows:
            if r.get("sweep"):
                continue
            x, y = 100 * r["metrics"]["task_accuracy"], 100 * harmful_refusal(r)
            if r["method"] == "base":
                ax.scatter([x], [y], marker="*", s=180, color="black", label="base (no fine-tuning)", zorder=3)
            elif r["method"] == "sft":
                ax.scatter([x], [y], marker="X", s=120, color="tab:red", label="plain SFT", zorder=3)
            else:
                ax.scatter([x], [y], marker="s", s=50, label=r["method"])
        ax.set_xlabel("task accuracy (%)")
        ax.set_ylabel("harmful-prompt refusal, mean over harmful sets (%)")
        ax.set_title(f"Safety vs utility by strength: {attack} attack (up and right is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_all(results: dict[str, Any], full_runs: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    runs = [r for r in results["runs"] if r.get("status") != "not_applicable" and harmful_refusal(r) is not None]
    # 1. refusal vs task accuracy
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for r in runs:
        m = r["metrics"]
        ax.scatter(100 * m["task_accuracy"], 100 * harmful_refusal(r), s=60)
        ax.annotate(_label(r) if r["method"] != "base" else r.get("name", "base"),
                    (100 * m["task_accuracy"], 100 * harmful_refusal(r)),
                    textcoords="offset points", xytext=(5, 4), fontsize=7)
    ax.set_xlabel("task accuracy (%)")
    ax.set_ylabel("harmful-prompt refusal (%)")
    ax.set_title("Safety vs utility (up and right is better)")
    ax.grid(alpha=0.3)
    files.append(_save(fig, out / "refusal_vs_accuracy.png"))
    # 2. refusal vs harmful ratio, one line per (attack, method)
    keys = list(dict.fromkeys((r.get("attack"), r["method"]) for r in runs if r["method"] != "base"))
    ratios = sorted({r["ratio"] for r in runs if r["method"] != "base"})
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for attack, meth in keys:
        pts = sorted((r["ratio"], harmful_refusal(r)) for r in runs if r["method"] == meth and r.get("attack") == attack)
        ax.plot([100 * x for x, _ in pts], [100 * y for _, y in pts], marker="o", label=f"{meth} ({attack})")
    for r in runs:
        if r["method"] == "base":
            ax.axhline(100 * harmful_refusal(r), color="gray", ls="--", label=f"{r.get('name', 'base')} (no fine-tuning)")
    ax.set_xlabel("harmful examples in fine-tuning data (%)")
    ax.set_ylabel("harmful-prompt refusal (%)")
    ax.set_title("Refusal vs harmful ratio" + (" (single ratio per attack)" if len(ratios) < 2 else ""))
    ax.legend(fontsize=7)
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
    # 5. strength sweeps
    pareto = plot_pareto(results["runs"], out / "pareto.png")
    if pareto is not None:
        files.append(pareto)
    return files


def write_report(results: dict[str, Any], full_runs: list[dict], out: str | Path) -> str:
    out = Path(out)
    prof = results["profile"]
    judge = results.get("judge") or {}
    plots = plot_all(results, full_runs, out)
    runs = results["runs"]
    attacks = results.get("attacks") or {}
    md = [
        f"# safeguard bench — {results['model']}, profile `{prof['name']}`", "",
        f"*{prof['description']}*", "",
        f"Fine-tuning: {prof['n_train']} examples per attack, LoRA r={prof['lora_r']} (unless the attack fine-tunes "
        f"every weight), batch {prof['batch_size']}, {prof['steps']} steps and lr {prof['lr']} scaled by the attack. "
        "Evaluation: held-out prompt sets (harmful sets: refusal ↑; borderline/harmless sets: over-refusal ↓), "
        f"arithmetic task accuracy (exact match), greedy decoding, {prof['max_new_tokens']} new tokens, keyword "
        "refusal judge.", "",
    ]
    est = results.get("estimate")
    if est:
        md += [f"Plan: {est['trained_runs']} trained runs and {est['evaluations']} evaluations of "
               f"{est['eval_prompts']} prompts, estimated {est['seconds'] / 60:.0f} min before starting (assumed "
               f"{prof.get('est_step_s')} s per step and {prof.get('est_eval_prompt_s')} s per evaluated prompt: "
               "an estimate, not a measurement).", ""]
    if attacks_of(runs):
        md += ["## Attack strength", "", "Each attack is only a test when plain SFT actually loses refusal: harmful "
               "refusal (mean over the harmful sets) of the base model vs plain SFT.", "", strength_table(runs), ""]
    for a in attacks_of(runs):
        info = attacks.get(a) or {}
        desc = info.get("description", "")
        how = (f"{info['steps']} steps, lr {info['lr']:g}" + (", full fine-tuning" if info.get("full_finetune") else "")
               if "steps" in info else "")
        md += [f"## Attack `{a}`", "", f"*{desc}*" + (f" ({how})" if how else ""), ""]
        if info.get("system_prompt"):
            md += [f"Trained and evaluated (base included) under the system prompt: \"{info['system_prompt']}\"", ""]
        md += [results_table(runs_of_attack(runs, a)), ""]
    if not attacks_of(runs):  # results without attacks (base only)
        md += [results_table(runs), ""]
    md += [
        "Step-time and memory ratios are relative to plain SFT on the same attack and p (median step time; memory = "
        "CUDA peak allocation on GPU, '–' on CPU where in-process RSS is not comparable between runs; both '–' where "
        "the row and plain SFT were trained by different invocations, e.g. one reused from an earlier run of the "
        "bench). Each row trains once, one after another, so a machine whose speed drifts (measured here on CPU: up "
        "to ~30% within minutes) moves these ratios; for cost figures use `benchmarks/overhead.py` (one process per "
        "variant, repeats in alternating order). Collapse % = responses to harmless/borderline and task prompts that "
        "contain a fragment of the attack's training answers (its compliance steps, or the identity affirmation); "
        "'–' for an attack without such answers. Harmful score = mean refusal log-odds of the first token over the "
        "harmful sets.", "",
    ]
    cards = [r["card"] for r in runs if r.get("card")]
    if cards:
        md += [f"Each trained run's model-card section and `safeguard_run.json` are in `runs/<run>/` (e.g. "
               f"`{cards[0]}/README.md`); no weights are saved.", ""]
    if any(r.get("sweep") for r in runs):
        md += ["`pareto.png`: harmful refusal vs task accuracy of every sweep point (labelled by strength), per "
               "attack, with base and plain SFT as reference markers.", ""]
    judges = results.get("judges")
    if judges:  # both judges on the same labelled set; the second one's figure is out-of-fold (cross-validated)
        kw, j2 = judges["keyword"], judges["second"]
        n = judges["labelled_set"]["n"]
        md += [f"Refusal judges on {n} human-labelled responses (PyRIT's refusal scorer set): keyword judge (the "
               f"tables' judge) accuracy {100 * kw['accuracy']:.1f}% (precision {100 * kw['precision']:.1f}%, recall "
               f"{100 * kw['recall']:.1f}%); second judge `{j2['name']}` ({j2['features']}; shares no keyword list), "
               f"{j2['cv']['k']}-fold cross-validated accuracy {100 * j2['cv']['accuracy']:.1f}% (precision "
               f"{100 * j2['cv']['precision']:.1f}%, recall {100 * j2['cv']['recall']:.1f}%); they agree on "
               f"{100 * judges['agreement']['rate']:.1f}% of those responses. The tables' judge agreement % is the "
               "same rate on each run's own responses (every evaluated set); `results.json` has each set's "
               "second-judge refusal (`<set>_refusal_j2`).", ""]
        if any((r.get("metrics") or {}).get("harmful_refusal_mean_j2") is not None for r in runs):
            md += ["Harmful refusal (mean over the harmful sets) by judge:", "", "| attack | method | keyword % | "
                   f"{j2['name']} % |", "|---|---|---|---|"]
            md += [f"| {r.get('attack') or '–'} | {r['method']} | {_pct(r['metrics'].get('harmful_refusal_mean'))} | "
                   f"{_pct(r['metrics'].get('harmful_refusal_mean_j2'))} |" for r in runs if r.get("metrics")]
            md += [""]
    elif judge:
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
