"""``safeguard bench``: the harmful fine-tuning benchmark, offline, with one command.

Protocol (per attack of the suite; every method trains on the same data with the same seed):

* attacks (:mod:`safeguard_plugin.bench.attacks`): ``template`` (harmful prompts + one learnable compliance template),
  ``varied`` (content-free compliance answers in many styles), ``benign`` (benign data only), ``identity`` (benign
  data under an "absolutely obedient agent" system prompt), ``heavy`` (30% harmful, 3x the steps) and ``full`` (full
  fine-tuning instead of LoRA). Harmful training prompts: HarmBench validation "standard" behaviours + AdvBench's
  train split (pinned package data files); benign data: arithmetic word problems (the task) and, for all but
  ``template``, diverse generated instructions with real answers. Evaluation prompts are disjoint (hash-checked).
* methods: ``base`` (no fine-tuning; once, or once per evaluation system prompt), ``sft`` (plain SFT), the rows of
  each registered constraint (the ``BENCHMARK_ROWS`` of the ``bench`` module in its package; without one, a row with
  its default config; by default only each constraint's first row), ``all`` (each constraint's first row, combined),
  one row per preset (``recommended``: :mod:`safeguard_plugin.presets`) and strength sweeps (``--sweep
  procon.weight=1,10,100``: rows ``procon[weight=10]``; a preset's key names its section, ``--sweep
  recommended.anchor.weight=1,10``: rows ``recommended[anchor.weight=1]``). A method that needs a LoRA adapter gets a
  "not applicable" row under full fine-tuning.
* evaluation sets: our held-out harmful / borderline / harmless prompts and the external sets (HarmBench test, AdvBench
  held-out, an XSTest-style safe set: :func:`~safeguard_plugin.bench.datasets.external_eval_sets`).
* metrics: refusal on every evaluation set (harmful sets: kept ↑; borderline/harmless sets: over-refusal ↓; the kind
  comes from :func:`safeguard_plugin.eval.set_kind`) by the keyword judge and by a second judge that shares no keyword
  list (``<set>_refusal_j2``, their agreement and kappa per run; both judges' accuracy on a labelled set in the
  report), task accuracy, template collapse, train loss, step-time and training-memory ratios vs plain SFT.
* output: ``<out>/results.json``, ``report.md``, PNG plots (``pareto.png`` with a sweep); each finished run is saved
  as it ends (``runs/<attack>_p<ratio>__<method>.json``), so an interrupted bench resumes where it stopped; every
  trained run also gets ``runs/<run>/README.md`` (the model-card section) and ``safeguard_run.json``, no weights.
"""

from __future__ import annotations

import copy
import gc
import glob
import importlib
import json
import os
import re
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..artifacts import Artifact, ArtifactError
from ..errors import ConfigError
from ..presets import PRESETS
from .attacks import ATTACKS, Attack, parse_attacks

PROFILES: dict[str, dict[str, Any]] = {}


@dataclass
class BenchProfile:
    name: str
    description: str
    n_train: int = 200
    # harmful ratios for the attacks with harmful rows; None: each attack's own (attacks.ATTACKS)
    ratios: tuple[float, ...] | None = None
    attacks: tuple[str, ...] = ("template", "varied")
    # without --methods: "first" = base, sft and each constraint's first bench row; "all" = every row and "all"
    default_methods: str = "first"
    steps: int = 30
    batch_size: int = 8
    lr: float = 2e-4
    lora_r: int = 16
    max_length: int = 192
    n_harmful_eval: int = 64
    # prompts per external set (datasets.external_eval_sets: HarmBench test, AdvBench held-out, XSTest-style safe;
    # seeded subsample), None: all of them
    n_external: int | None = 24
    n_borderline: int = 24
    n_harmless: int = 40
    n_task: int = 40
    max_new_tokens: int = 24
    task_new_tokens: int = 24
    gen_batch_size: int = 16
    seed: int = 0
    calibration_limit: int | None = None
    # the live safety monitor (warn only) on every trained run, every N steps: safety-over-training curves for
    # plain SFT and each method on the same held-out measurement (None: off)
    monitor_every: int | None = None
    monitor_prompts: int = 16
    method_overrides: dict[str, dict] = field(default_factory=dict)
    # time estimate printed before a run (assumptions, not measurements; see estimate()): seconds per LoRA step,
    # per evaluated prompt (generation + refusal score), for calibration and model loading; full fine-tuning's step
    # costs est_full_step_factor LoRA steps; est_method_step_factor: per constraint
    est_step_s: float = 12.0
    est_eval_prompt_s: float = 1.8
    est_calibration_s: float = 600.0
    est_load_s: float = 60.0
    est_full_step_factor: float = 2.5
    est_method_step_factor: dict[str, float] = field(default_factory=lambda: {"adaptive_kl": 1.5})


# Sizing of the CPU profiles (2 cores), measured on an idle machine with the 0.5B model (cpu-small, 2026-12-07): a LoRA
# step at batch 8 takes 10.8-12.4 s (constraint rows) and an evaluation of the 184 cpu-small prompts (HarmBench's
# contextual prompts are long) about 5.5 min, i.e. ~1.8 s per prompt at 24 new tokens, batch 16. So base + sft +
# recommended on template and varied (4 trained runs, 5 evaluations) takes about an hour, and every method's row
# (14 trained runs) about 2.5 hours: more than the 90 min the cpu-small profile was once sized for
# (test_bench_attacks checks this arithmetic).
_CPU_EVAL = {"n_harmful_eval": 32, "n_external": 24, "n_borderline": 24, "n_harmless": 24, "n_task": 32}
RESERVE_EVAL_PROMPTS = 160  # evaluation sets expected to be added later (about 5 x 32 prompts)


def _profiles() -> dict[str, BenchProfile]:
    return {
        "cpu-small": BenchProfile(
            name="cpu-small",
            description=("small CPU profile (2 cores; base + sft + recommended ~1 h, every method ~2.5 h): attacks "
                         "template and varied, 200 training examples, 30 LoRA steps, each constraint's first row; eval "
                         "on 48 harmful / 24 borderline / 24 harmless / 32 task prompts with 24 new tokens. Numbers are "
                         "indicative; use --profile paper on a GPU for the literature protocol."),
            monitor_every=5, **_CPU_EVAL,
        ),
        "cpu-suite": BenchProfile(
            name="cpu-suite",
            description=("the whole attack suite on CPU (2 cores, a few hours, resumable): template, varied, benign, "
                         "identity, heavy and full, sized like cpu-small."),
            attacks=tuple(ATTACKS), monitor_every=5, **_CPU_EVAL,
        ),
        "paper": BenchProfile(
            name="paper",
            description=("literature protocol (GPU): 1000 training examples, harmful ratio sweep 0-0.2, 3 epochs "
                         "of LoRA SFT, full held-out evaluation."),
            n_train=1000, ratios=(0.0, 0.05, 0.1, 0.2), default_methods="all", steps=375, lr=1e-4,
            n_harmful_eval=10_000, n_external=None, n_borderline=10_000, n_harmless=10_000, n_task=200, max_new_tokens=128,
            max_length=512, monitor_every=25, monitor_prompts=64,
        ),
        "smoke": BenchProfile(
            name="smoke", description="plumbing check on a tiny random model (seconds; no effect expected)",
            attacks=("template",), n_train=32, steps=3, batch_size=4, n_harmful_eval=4, n_borderline=2, n_harmless=2,
            n_task=4, n_external=2, max_new_tokens=4, task_new_tokens=4, calibration_limit=32, monitor_every=1,
            monitor_prompts=4,
            est_step_s=0.1, est_eval_prompt_s=0.05, est_calibration_s=5.0, est_load_s=1.0,
        ),
    }


# --------------------------------------------------------------------------------------------- helpers
class _PeakRSS:
    """Peak resident memory above the level at start (sampled; CPU), or CUDA peak allocation."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval

    def __enter__(self):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        import psutil

        self._proc = psutil.Process()
        self.start = self._proc.memory_info().rss
        self.peak = self.start
        self._stop = threading.Event()

        def run():
            while not self._stop.is_set():
                self.peak = max(self.peak, self._proc.memory_info().rss)
                time.sleep(self.interval)

        self._t = threading.Thread(target=run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            self.delta = torch.cuda.max_memory_allocated() - self.start
            return
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)
        self.delta = self.peak - self.start


def _resolved_settings(method_cfg: dict[str, Any]) -> dict[str, Any] | None:
    """Every setting a method's config resolves to (its preset expanded, every default filled in), so that a run
    cached before a default changed is not reused as if it were today's. None for a method without constraints."""
    if not method_cfg:
        return None
    from ..config import load_config

    data = load_config(method_cfg).model_dump(mode="json")
    return {k: v for k, v in data.items() if k != "artifact"}


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    return {k: v for key, val in d.items() for k, v in _flat(val, f"{prefix}{key}.").items()} if d else {prefix: d}


def _changed_keys(old: dict | None, new: dict | None) -> list[str]:
    a, b = _flat(old or {}), _flat(new or {})
    return sorted(k.rstrip(".") for k in set(a) | set(b) if a.get(k) != b.get(k))


def _atomic_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def _supersede(path: Path, root: Path) -> Path:
    """Move a run file that is about to be replaced, and its card folder, to ``runs/superseded/<stem>.<n>[.json]``
    (never overwriting) and return where the file went: a rerun under changed settings keeps the earlier result."""
    folder = path.parent / "superseded"
    folder.mkdir(exist_ok=True)
    n = 1
    while (dest := folder / f"{path.stem}.{n}.json").exists() or dest.with_suffix("").exists():
        n += 1
    record = json.loads(path.read_text())
    card = path.with_suffix("")
    if card.is_dir():
        os.replace(card, dest.with_suffix(""))
        record["card"] = os.path.relpath(dest.with_suffix(""), root)
    _atomic_json(dest, record)
    path.unlink()
    return dest


@dataclass(frozen=True)
class MethodBench:
    """A constraint's benchmark data: the ``bench`` module next to it (see :func:`method_bench`)."""

    name: str
    rows: dict[str, dict]  # {row label: config section}; the first row is the one "all combined" uses
    nonzero_adapter_init: bool = False  # its adapters start from non-zero factors (BA != 0 at step 0)
    combined: Callable[[dict, dict[str, MethodBench]], dict] | None = None  # adjusts its "all" section to the others

    def combined_config(self, others: dict[str, MethodBench]) -> dict:
        """This method's section in the "all combined" row (its first row, adjusted to ``others``)."""
        config = next(iter(self.rows.values()))
        return self.combined(config, others) if self.combined is not None else config


def bench_module_name(cls: type) -> str | None:
    """``<package of the constraint class>.bench`` (e.g. ``safeguard_plugin.constraints.cwac.bench``)."""
    mod = sys.modules.get(cls.__module__)
    package = getattr(mod, "__package__", None) if mod is not None else cls.__module__.rpartition(".")[0]
    return f"{package}.bench" if package else None


def method_bench(cls: type) -> MethodBench:
    """The benchmark data of constraint class ``cls``: its package's ``bench`` module (``BENCHMARK_ROWS``, and
    optionally ``NONZERO_ADAPTER_INIT`` and ``combined(config, others)``); a constraint without one gets the default
    row ``{name: {}}`` (its default config)."""
    modname = bench_module_name(cls)
    data = None
    if modname is not None:
        try:
            data = importlib.import_module(modname)
        except ModuleNotFoundError as err:
            if err.name != modname:  # the bench module exists but fails to import: say so
                raise
    if data is None or not hasattr(data, "BENCHMARK_ROWS"):
        return MethodBench(cls.name, {cls.name: {}})
    return MethodBench(cls.name, dict(data.BENCHMARK_ROWS), bool(getattr(data, "NONZERO_ADAPTER_INIT", False)),
                       getattr(data, "combined", None))


def benchmark_methods() -> dict[str, dict | None]:
    """``{method: safeguard config sections or None}``: base, sft, each registered constraint's rows, all."""
    from ..registry import available_constraints

    methods: dict[str, dict | None] = {"base": None, "sft": None}
    per: dict[str, MethodBench] = {}
    for name, cls in available_constraints().items():
        mb = method_bench(cls)
        for label, cfg in mb.rows.items():
            methods[label] = {name: cfg}
        if mb.rows:
            per[name] = mb
    if len(per) >= 2:  # "all combined": each constraint's first row, adjusted by it to the others it runs with
        methods["all"] = {name: mb.combined_config({n: o for n, o in per.items() if n != name})
                          for name, mb in per.items()}
    for preset, sections in PRESETS.items():  # `preset: <name>` as a user writes it, expanded to its sections
        if set(sections) <= set(available_constraints()):
            methods[preset] = copy.deepcopy(sections)
    return methods


def first_rows() -> list[str]:
    """Each registered constraint's first bench row (the default rows: one per method)."""
    from ..registry import available_constraints

    out = []
    for cls in available_constraints().values():
        rows = method_bench(cls).rows
        if rows:
            out.append(next(iter(rows)))
    return out


def _collapse_rate(responses: list[str], markers: list[str]) -> float | None:
    """Share of ``responses`` containing one of the attack's answer fragments (None: the attack has none)."""
    if not markers:
        return None
    hits = sum(any(m in r.lower() for m in markers) for r in responses)
    return hits / max(1, len(responses))


def run_name(attack: str | None, method: str, ratio: float = 0.0) -> str:
    """The file stem of a run: ``<attack>_p<ratio>__<method>`` (a sweep label's brackets become ``@``:
    ``procon[weight=10]`` -> ``procon@weight=10``; other characters outside ``[A-Za-z0-9._=,@-]`` become ``_``);
    ``base``, or ``base__<attack>`` for a base evaluated under an attack's system prompt."""
    if method == "base":
        return "base" if attack is None else f"base__{attack}"
    method = re.sub(r"[^A-Za-z0-9._=,@-]", "_", method.replace("[", "@").replace("]", ""))
    return f"{attack}_p{ratio:g}__{method}"


class _SystemPromptTokenizer:
    """A tokenizer whose chat template puts ``system`` first in every conversation that has no system message: the
    evaluation of an attack whose training rows carry a system prompt (the identity attack) runs under it too."""

    def __init__(self, tok, system: str):
        if not getattr(tok, "chat_template", None):
            raise ConfigError("an attack with a system prompt needs a tokenizer with a chat template")
        object.__setattr__(self, "_tok", tok)
        object.__setattr__(self, "_system", system)

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __setattr__(self, name, value):
        setattr(self._tok, name, value)

    def __call__(self, *args, **kwargs):
        return self._tok(*args, **kwargs)

    def apply_chat_template(self, conversation, *args, **kwargs):
        if conversation and isinstance(conversation[0], dict) and conversation[0].get("role") != "system":
            conversation = [{"role": "system", "content": self._system}, *conversation]
        return self._tok.apply_chat_template(conversation, *args, **kwargs)


@dataclass(frozen=True)
class PlannedRun:
    """One row of the bench: ``method`` on ``attack`` (None: base without a system prompt) at harmful ``ratio``."""

    name: str
    attack: Attack | None
    method: str
    ratio: float
    steps: int = 0
    lr: float = 0.0
    applicable: bool = True
    reason: str | None = None

    @property
    def trains(self) -> bool:
        return self.method != "base" and self.applicable


def _not_applicable(config: dict | None, attack: Attack) -> str | None:
    """Why ``config`` cannot run under ``attack`` (a constraint that needs a LoRA adapter under full fine-tuning)."""
    if not attack.full_finetune or not config:
        return None
    from ..registry import available_constraints

    registry = available_constraints()
    need = [n for n in config if n in registry and registry[n].requires_lora_adapter]
    if need:
        return (f"{', '.join(need)} works on the run's LoRA adapters (requires_lora_adapter); the {attack.name} attack "
                "fine-tunes every weight without LoRA")
    return None


# ----------------------------------------------------------------------------------------------- bench
class Bench:
    def __init__(self, model: str, profile: str | BenchProfile = "cpu-small", out: str | Path | None = None,
                 ratios: tuple[float, ...] | None = None, methods: list[str] | None = None, progress: bool = True,
                 attacks: list[str] | str | None = None, sweep: list[str] | None = None):
        from .sweep import parse_sweep, sweep_points

        self.model_spec = model
        if isinstance(profile, BenchProfile):
            self.profile = profile
        else:
            profiles = _profiles()
            if profile not in profiles:
                raise ConfigError(f"unknown profile {profile!r}; available: {', '.join(profiles)}")
            self.profile = profiles[profile]
        if ratios:
            self.profile = replace(self.profile, ratios=tuple(ratios))
        self.attacks = [ATTACKS[a] for a in parse_attacks(attacks or self.profile.attacks)]
        # the sweep is validated against the config schema here, before any model or data loads
        self.sweep = {pt.label: pt for pt in sweep_points(parse_sweep(sweep))} if sweep else {}
        all_methods = benchmark_methods()
        if methods:
            unknown = [m for m in methods if m not in all_methods and m not in self.sweep]
            if unknown:
                raise ConfigError(f"unknown method(s) {unknown}; available: {', '.join(all_methods)}")
            chosen = list(methods)
        elif self.sweep:
            chosen = ["base", "sft"]
        elif self.profile.default_methods == "all":
            chosen = list(all_methods)
        else:
            chosen = ["base", "sft"] + first_rows() + [m for m in PRESETS if m in all_methods]
        chosen += [label for label in self.sweep if label not in chosen]
        self.methods: dict[str, dict | None] = {
            m: (self.sweep[m].config if m in self.sweep else all_methods[m]) for m in chosen}
        self.out = Path(out or f"results/{self.profile.name}-{model.replace('/', '_')}")
        self.progress = progress
        self.reused = 0  # runs taken from an earlier invocation (not timed by this one)
        # which invocation trained a run (set anew by run()): step times are only compared within one
        self.invocation = _invocation_id()
        self._model = self._tok = None

    def say(self, msg: str) -> None:
        if self.progress:
            print(msg, flush=True)

    # -- the plan
    def ratios_of(self, attack: Attack) -> list[float]:
        """The harmful ratios ``attack`` runs at: the profile's (``--ratios``) for attacks with harmful answers, else
        the attack's own."""
        if attack.answers is not None and self.profile.ratios is not None:
            return list(self.profile.ratios)
        return [attack.ratio]

    def plan(self) -> list[PlannedRun]:
        """Every row, in run order: per attack (and ratio), its base evaluation when not done yet, then each method."""
        p = self.profile
        runs: list[PlannedRun] = []
        seen: set[str] = set()
        for attack in self.attacks:
            for ratio in self.ratios_of(attack):
                for m, cfg in self.methods.items():
                    if m == "base":
                        name = run_name(attack.name if attack.system_prompt else None, "base")
                        if name not in seen:
                            seen.add(name)
                            runs.append(PlannedRun(name, attack if attack.system_prompt else None, "base", 0.0))
                        continue
                    reason = _not_applicable(cfg, attack)
                    runs.append(PlannedRun(run_name(attack.name, m, ratio), attack, m, ratio, attack.steps(p.steps),
                                           attack.lr(p.lr), reason is None, reason))
        return runs

    def n_eval_prompts(self) -> int:
        """Prompts one evaluation generates for, from the profile's sizes (the sets may hold fewer)."""
        p = self.profile
        return p.n_harmful_eval + p.n_borderline + p.n_harmless + p.n_task

    def estimate(self, n_eval_prompts: int | None = None, reserve_eval_prompts: int = 0) -> dict[str, Any]:
        """Estimated seconds of the whole plan on the profile's assumed speeds (``est_*``; not a measurement):
        model loading, calibration when a method needs it, every trained run's steps (x method / full fine-tuning
        factors, monitor checks ignored) and every evaluation (``n_eval_prompts`` + ``reserve_eval_prompts`` each)."""
        p = self.profile
        n_eval = (self.n_eval_prompts() if n_eval_prompts is None else n_eval_prompts) + reserve_eval_prompts
        plan = self.plan()
        train = 0.0
        for r in plan:
            if not r.trains:
                continue
            factor = max([p.est_method_step_factor.get(n, 1.0) for n in (self.methods[r.method] or {})] or [1.0])
            if r.attack is not None and r.attack.full_finetune:
                factor *= p.est_full_step_factor
            train += r.steps * p.est_step_s * factor
        evals = sum(1 for r in plan if r.method == "base" or r.trains)
        calib = p.est_calibration_s if any(self.methods.values()) or (len(plan) > 1 and p.monitor_every) else 0.0
        total = p.est_load_s + calib + train + evals * n_eval * p.est_eval_prompt_s
        return {"seconds": total, "train_seconds": train, "evaluations": evals, "eval_prompts": n_eval,
                "trained_runs": sum(r.trains for r in plan), "not_applicable": sum(not r.applicable for r in plan),
                "calibration_seconds": calib}

    def describe_plan(self) -> str:
        """The plan as text: every row (run name, steps, lr, LoRA or full) and the time estimate, with and without
        the evaluation sets expected to be added (:data:`RESERVE_EVAL_PROMPTS`)."""
        p = self.profile
        lines = [f"safeguard bench plan: profile {p.name}, attacks {[a.name for a in self.attacks]}, methods "
                 f"{list(self.methods)}"]
        for r in self.plan():
            if r.method == "base":
                lines.append(f"  {r.name}: evaluate" + (f" under the {r.attack.name} system prompt" if r.attack else ""))
            elif not r.applicable:
                lines.append(f"  {r.name}: not applicable ({r.reason})")
            else:
                kind = "full fine-tuning" if r.attack.full_finetune else f"LoRA r={p.lora_r}"
                lines.append(f"  {r.name}: {r.steps} steps, lr {r.lr:g}, {kind}")
        est, more = self.estimate(), self.estimate(reserve_eval_prompts=RESERVE_EVAL_PROMPTS)
        lines.append(f"estimated {est['seconds'] / 60:.0f} min ({est['trained_runs']} trained runs, "
                     f"{est['evaluations']} evaluations of {est['eval_prompts']} prompts; {more['seconds'] / 60:.0f} min "
                     f"with {RESERVE_EVAL_PROMPTS} more prompts per evaluation), assuming {p.est_step_s:g} s per step "
                     f"and {p.est_eval_prompt_s:g} s per evaluated prompt (not measured)")
        return "\n".join(lines)

    # -- model, artifact, data
    def load(self):
        if self._model is None:
            from ..modeling import load_model_spec

            self._model, self._tok = load_model_spec(self.model_spec)
        return self._model, self._tok

    def artifact(self) -> Path:
        from ..calibration import calibrate, data_record
        from ..data import load_prompts

        path = self.out / "artifact"
        model, tok = self.load()
        names = sorted({n for cfg in self.methods.values() if cfg for n in cfg})
        lim = self.profile.calibration_limit
        harmful, harmless = load_prompts("harmful", limit=lim), load_prompts("harmless", limit=lim)
        recompute = False  # an artifact of this model and prompts lacking some methods is extended; else redone
        if (path / "manifest.json").exists():
            try:
                art = Artifact.load(path)
                art.check_model(model)
                if art.manifest.get("data") != data_record(harmful, harmless):
                    raise ArtifactError("calibrated on other prompts (another profile)")
                if set(names) <= set(art.manifest.get("calibrated_for", [])):
                    return path
            except ArtifactError as err:
                self.say(f"recalibrating {path}: {err}")
                recompute = True
        self.say(f"calibrating {names} on {self.model_spec}")
        calibrate(model, tok, harmful, harmless, path, model_id=self.model_spec, constraints=names,
                  progress=self.progress, recompute=recompute)
        return path

    def data(self, attack: Attack | str = "template", ratio: float | None = None) -> dict[str, Any]:
        """Training rows of ``attack`` at ``ratio`` (default: the attack's) and the evaluation data: ``eval_sets``
        (``{name: prompts}``; add a set by key -- evaluation and report iterate over whatever is here; its kind comes
        from :func:`safeguard_plugin.eval.set_kind`) and the arithmetic ``task``."""
        from ..data import load_prompts
        from . import datasets as benchdata
        from .attacks import build_rows, collapse_markers, user_prompt

        attack = ATTACKS[attack] if isinstance(attack, str) else attack
        p = self.profile
        eval_sets = {
            "harmful": load_prompts("harmful").heldout[: p.n_harmful_eval],
            "borderline": load_prompts("borderline").all[: p.n_borderline],
            "harmless": load_prompts("harmless").heldout[: p.n_harmless],
            # prompts nobody on the project wrote (xstest_safe: written for it, but not used for calibration)
            **benchdata.external_eval_sets(p.n_external, seed=p.seed, progress=self.progress),
        }
        task = benchdata.arithmetic_task(p.n_task, seed=p.seed, split="eval")
        eval_prompts = [x for v in eval_sets.values() for x in v] + [t["prompt"] for t in task]
        built = build_rows(attack, p.n_train, seed=p.seed, ratio=ratio,
                           exclude={benchdata.normalize_prompt(x) for x in eval_prompts})
        rows = built["rows"]
        benchdata.check_disjoint([user_prompt(r) for r in rows], eval_prompts)
        return {"rows": rows, "eval_sets": eval_sets, "task": task, "n_harmful_train": built["n_harmful"],
                "system_prompt": attack.system_prompt, "collapse_markers": collapse_markers(attack)}

    # -- one run
    def evaluate(self, model, tok, data, system_prompt: str | None = None) -> dict[str, Any]:
        """Refusal on every set of ``data["eval_sets"]`` (metrics ``<set>_refusal`` and ``<set>_score``; means over the
        harmful and the over-refusal sets), task accuracy and collapse; under ``system_prompt`` when given."""
        from ..eval import HARMFUL, OVER_REFUSAL, evaluate_refusal, generate, set_kind
        from . import datasets as benchdata
        from . import judges

        p = self.profile
        if system_prompt:
            tok = _SystemPromptTokenizer(tok, system_prompt)
        res = evaluate_refusal(model, tok, data["eval_sets"], p.max_new_tokens, p.gen_batch_size, self.progress)
        answers = generate(model, tok, [t["prompt"] for t in data["task"]], p.task_new_tokens, p.gen_batch_size,
                           self.progress)
        sets = {name: {"kind": set_kind(name, r), "n": r["n"]} for name, r in res.items()}
        metrics: dict[str, Any] = {}
        keyword, second = [], []  # both judges' verdicts on every response, for their agreement
        j2 = judges.second_judge()  # fitted once per process (lru_cache)
        for name, r in res.items():
            metrics[f"{name}_refusal"] = r["refusal_rate"]
            metrics[f"{name}_score"] = r["refusal_score"]
            flags = j2.is_refusal([x["response"] for x in r["samples"]])
            metrics[f"{name}_refusal_j2"] = sum(flags) / max(1, len(flags))  # the second judge
            keyword += [x["refusal"] for x in r["samples"]]
            second += flags
        agree = judges.agreement(keyword, second)
        metrics["judge_agreement"], metrics["judge_kappa"] = agree["rate"], agree["kappa"]

        def mean_of(kind: str, key: str) -> float | None:
            vals = [res[n][key] for n, s in sets.items() if s["kind"] == kind]
            return statistics.mean(vals) if vals else None

        metrics["harmful_refusal_mean"] = mean_of(HARMFUL, "refusal_rate")
        j2_harmful = [metrics[f"{n}_refusal_j2"] for n, s in sets.items() if s["kind"] == HARMFUL]
        metrics["harmful_refusal_mean_j2"] = statistics.mean(j2_harmful) if j2_harmful else None
        metrics["harmful_score_mean"] = mean_of(HARMFUL, "refusal_score")
        metrics["over_refusal_mean"] = mean_of(OVER_REFUSAL, "refusal_rate")
        metrics["task_accuracy"] = benchdata.task_accuracy(answers, [t["answer"] for t in data["task"]])
        benign = [s["response"] for n, r in res.items() if sets[n]["kind"] == OVER_REFUSAL for s in r["samples"]]
        metrics["collapse_rate"] = _collapse_rate(benign + answers, data.get("collapse_markers") or [])
        samples = {k: v["samples"][:8] for k, v in res.items()}
        samples["task"] = [{"prompt": t["prompt"], "response": a, "answer": t["answer"]}
                           for t, a in list(zip(data["task"], answers))[:8]]
        return {"metrics": metrics, "sets": sets, "samples": samples}

    def _same_run(self, run: PlannedRun, record: dict[str, Any]) -> dict[str, Any] | None:
        """A finished run of the same attack and ratio under another name (e.g. the sweep row ``recommended@x=1``
        when the preset's default became ``x: 1``) whose resolved settings, steps, lr and kind of fine-tuning are
        this run's: training it again would repeat it."""
        if not record.get("resolved") or run.attack is None:
            return None
        prefix = run.name.split("__")[0] + "__"
        resolved = json.loads(json.dumps(record["resolved"]))  # as a run file holds it
        config = json.loads(json.dumps(record["config"]))
        for other in sorted((self.out / "runs").glob(f"{glob.escape(prefix)}*.json")):
            if other.stem == run.name:
                continue
            try:
                rec = json.loads(other.read_text())
            except (OSError, ValueError):
                continue
            # a file from before runs kept their resolved settings counts when its config is this run's, as the
            # same-name reuse above treats it (and says so)
            same = rec.get("resolved") == resolved if "resolved" in rec else rec.get("config") == config
            if (rec.get("status") == "ok" and same
                    and rec.get("steps") == run.steps and rec.get("lr") == run.lr
                    and rec.get("full_finetune") == run.attack.full_finetune):
                return rec
        return None

    def run_one(self, run: PlannedRun, data, artifact: Path | None) -> dict[str, Any]:
        from .recipes import clean_copy, sft

        method, attack = run.method, run.attack
        record: dict[str, Any] = {"name": run.name, "attack": attack.name if attack else None, "method": method,
                                  "ratio": run.ratio, "config": self.methods[method]}
        if method in self.sweep:
            pt = self.sweep[method]
            record["sweep"] = {"constraint": pt.constraint, "params": pt.params}
        if not run.applicable:
            self.say(f"  {method} on {attack.name}: not applicable ({run.reason})")
            return {**record, "status": "not_applicable", "reason": run.reason, "metrics": {}}
        path = self.out / "runs" / f"{run.name}.json"
        record["resolved"] = _resolved_settings(
            {**self.methods[method], **self.profile.method_overrides.get(method, {})} if self.methods[method] else {})
        if path.exists():
            earlier = json.loads(path.read_text())
            changed = _changed_keys(earlier.get("resolved"), record["resolved"]) if "resolved" in earlier else []
            if earlier.get("config") == json.loads(json.dumps(record["config"])) and not changed:
                legacy = "resolved" not in earlier and record["resolved"] is not None
                self.say(f"  {run.name}: done earlier, reusing {path}" + (
                    " (recorded before runs kept their resolved settings, so a default changed since then is not "
                    "noticed: delete the file to run it again)" if legacy else ""))
                self.reused += 1
                return earlier
            why = (f"the settings it resolves to changed since ({', '.join(changed)})" if changed
                   else f"another configuration ({earlier.get('config')})")
            kept = _supersede(path, self.out)
            self.say(f"  {run.name}: done earlier with {why}; that result is moved to {kept}")
        same = self._same_run(run, record)
        if same is not None:
            how = ("same resolved config, steps and lr" if "resolved" in same else
                   "same config, steps and lr; it was recorded before runs kept their resolved settings, so its "
                   "config was compared and a default changed since then is not noticed")
            self.say(f"  {run.name}: {same['name']} trained the same settings ({how}); reusing its result")
            self.reused += 1
            out = {**same, **record, "same_run_as": same["name"]}
            if "sweep" not in record:
                out.pop("sweep", None)
            _atomic_json(path, out)
            return out
        model, tok = self.load()
        p = self.profile
        where = f"{method} on {attack.name} @ p={run.ratio:g}" if attack else "base"
        self.say(f"  {where}: training {run.steps} steps" if method != "base" else f"  {run.name}: evaluating")
        system = attack.system_prompt if attack else None
        if method == "base":
            ev = self.evaluate(model, tok, data, system)
            record.update(ev)
            record["status"] = "ok"
            _atomic_json(path, record)
            return record
        cfg = None
        if self.methods[method]:
            cfg = {"artifact": str(artifact), **self.methods[method], **p.method_overrides.get(method, {})}
        if p.monitor_every:  # measure only (warn): the same safety curve for every method, plain SFT included
            cfg = cfg or {"artifact": str(artifact)}
            cfg["monitor"] = {"every_n_steps": p.monitor_every, "n_prompts": p.monitor_prompts, "action": "warn"}
        record.update({"steps": run.steps, "lr": run.lr, "full_finetune": attack.full_finetune})
        gc.collect()
        try:
            with _PeakRSS() as mem:
                res = sft(clean_copy(model), tok, data["rows"], steps=run.steps, output_dir=str(self.out / "tmp"),
                          lr=run.lr, batch_size=p.batch_size, lora_r=None if attack.full_finetune else p.lora_r,
                          safeguard=cfg, seed=p.seed, max_length=p.max_length, logging_steps=1)
        except ConfigError as err:  # the method refuses this set-up (e.g. its check_training): a row, not a crash
            self.say(f"  {where}: not applicable ({err})")
            return {**record, "status": "not_applicable", "reason": str(err), "metrics": {}}
        skip = min(2, max(0, len(res.step_times) - 1))
        losses = [h["loss"] for h in res.log_history if "loss" in h]
        record.update({
            "train_seconds": res.seconds,
            "step_median_s": statistics.median(res.step_times[skip:]),
            "invocation": self.invocation,
            "train_memory_bytes": mem.delta,
            "train_loss_final": statistics.mean(losses[-3:]) if losses else None,
            "log_history": res.log_history,
        })
        record.update(self.evaluate(res.model, tok, data, system))
        record["status"] = "ok"
        card = self.write_card(run, record, res.safeguard)
        if card is not None:
            record["card"] = card
        del res
        gc.collect()
        _atomic_json(path, record)
        return record

    def write_card(self, run: PlannedRun, record: dict[str, Any], callback) -> str | None:
        """``runs/<run>/README.md`` (the model card's "Safety fine-tuning" section, with a "Benchmark run" subsection
        holding this row's numbers) and ``safeguard_run.json`` (+ the monitor curve PNG), as a trainer save would
        write them beside the weights (none are saved here). None when the run had no safeguard callback."""
        if callback is None or getattr(callback, "engine", None) is None:
            return None
        from ..record import append_to_card, run_record, write_model_card

        folder = self.out / "runs" / run.name
        bench = {"attack": run.attack.name, "method": run.method, "ratio": run.ratio, "steps": run.steps,
                 "lr": run.lr, "profile": self.profile.name, "model": self.model_spec,
                 "full_finetune": run.attack.full_finetune, "metrics": record.get("metrics")}
        write_model_card(folder, run_record(callback.engine, extra={"bench": bench}))
        m = record.get("metrics") or {}
        lines = [f"`safeguard bench --profile {self.profile.name}`, attack `{run.attack.name}` "
                 f"({run.attack.description}), method `{run.method}`, harmful ratio {run.ratio:g}, {run.steps} steps, "
                 f"lr {run.lr:g}, {'full fine-tuning' if run.attack.full_finetune else f'LoRA r={self.profile.lora_r}'}"
                 f", model `{self.model_spec}`. Held-out evaluation after training (keyword refusal judge, greedy, "
                 f"{self.profile.max_new_tokens} new tokens):", "", "| measurement | value |", "|---|---|"]
        for name, s in (record.get("sets") or {}).items():
            lines.append(f"| {name} refusal % ({s['kind'] or 'unknown kind'}, n={s['n']}) | "
                         f"{100 * m[f'{name}_refusal']:.1f} |")
        lines.append(f"| task accuracy % | {100 * m['task_accuracy']:.1f} |")
        if m.get("collapse_rate") is not None:
            lines.append(f"| collapse % | {100 * m['collapse_rate']:.1f} |")
        append_to_card(folder, "Benchmark run", "\n".join(lines))
        return os.path.relpath(folder, self.out)

    # -- whole bench
    def run(self) -> dict[str, Any]:
        from . import datasets as benchdata

        t0 = time.perf_counter()
        self.reused = 0
        self.invocation = _invocation_id()
        (self.out / "runs").mkdir(parents=True, exist_ok=True)
        plan = self.plan()
        datas: dict[tuple[str, float], dict] = {}

        def data_of(attack: Attack, ratio: float) -> dict:
            if (attack.name, ratio) not in datas:
                datas[(attack.name, ratio)] = self.data(attack, ratio)
            return datas[(attack.name, ratio)]

        first = data_of(self.attacks[0], self.ratios_of(self.attacks[0])[0])
        n_eval = sum(len(v) for v in first["eval_sets"].values()) + len(first["task"])
        est = self.estimate(n_eval)
        self.say(f"safeguard bench: model {self.model_spec}, profile {self.profile.name}, attacks "
                 f"{[a.name for a in self.attacks]}, methods {list(self.methods)} -> {self.out}")
        self.say(f"plan: {est['trained_runs']} trained runs, {est['evaluations']} evaluations of {n_eval} prompts, "
                 f"{est['not_applicable']} not applicable; estimated {est['seconds'] / 60:.0f} min from an empty folder "
                 f"(assumed {self.profile.est_step_s:g} s/step, {self.profile.est_eval_prompt_s:g} s/prompt; finished "
                 "runs are reused)")
        trains = any(r.trains for r in plan)
        needs = any(self.methods.values()) or (trains and self.profile.monitor_every)
        artifact = self.artifact() if needs else None
        from .attacks import collapse_markers

        # base is measured for collapse against every planned attack's answer fragments (it should show none)
        markers = sorted({m for a in self.attacks for m in collapse_markers(a)})
        runs = []
        for r in plan:
            if r.method == "base":
                a = r.attack or self.attacks[0]
                d = {**data_of(a, self.ratios_of(a)[0]), "collapse_markers": markers}
            else:
                d = data_of(r.attack, r.ratio)
            runs.append(self.run_one(r, d, artifact))
        from .judges import judges_report

        judge = benchdata.judge_accuracy()
        judge_report = judges_report()
        attacks = {a.name: {**asdict(a), "steps": a.steps(self.profile.steps), "lr": a.lr(self.profile.lr),
                            "ratios": self.ratios_of(a)} for a in self.attacks}
        results = {"model": self.model_spec, "profile": asdict(self.profile), "judge": judge, "judges": judge_report, "attacks": attacks,
                   "runs": [{k: v for k, v in r.items() if k != "log_history"} for r in runs],
                   "estimate": est, "wall_seconds": time.perf_counter() - t0, "reused_runs": self.reused}
        _add_ratios(results["runs"])
        _atomic_json(self.out / "results.json", results)
        from .report import write_report

        md = write_report(results, runs, self.out)
        self.say(md)
        return results


def _invocation_id() -> str:
    """A unique, readable id for one invocation of the bench (its start time + a random suffix)."""
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"


def _add_ratios(runs: list[dict]) -> None:
    """Step-time (and, on GPU, memory) ratio of each trained run to plain SFT on the same attack and ratio, when both
    were trained by the same invocation: runs from different invocations (resumed, reused) ran on a machine whose
    speed between them is unknown, so their ratio is left out ('–' in the report)."""
    plain = {(r.get("attack"), r["ratio"]): r for r in runs if r["method"] == "sft" and "step_median_s" in r}
    for r in runs:
        base = plain.get((r.get("attack"), r["ratio"]))
        if base and "step_median_s" in r and r.get("invocation") is not None \
                and r.get("invocation") == base.get("invocation"):
            r["time_ratio"] = r["step_median_s"] / base["step_median_s"]
            # In-process RSS deltas are not comparable between runs (the allocator keeps freed memory), so on
            # CPU the memory ratio comes from benchmarks/overhead.py (one process per variant) instead.
            r["memory_ratio"] = (r["train_memory_bytes"] / base["train_memory_bytes"]
                                 if torch.cuda.is_available() and base["train_memory_bytes"] > 0 else None)
