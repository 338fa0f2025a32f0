"""``safeguard bench``: the harmful fine-tuning benchmark, offline, with one command.

Protocol (per harmful ratio p, every method trains on the same data with the same seed):

* data: a deterministic benign task with exact-match answers (arithmetic word problems) mixed with harmful
  prompts (HarmBench validation "standard" behaviours + AdvBench, from pinned package data files) paired with
  content-free compliance-style answers, at ratio p. Evaluation prompts are disjoint (hash-checked).
* methods: ``base`` (no fine-tuning), ``sft`` (plain LoRA SFT), the rows of each registered constraint (the
  ``BENCHMARK_ROWS`` of the ``bench`` module in its package; without one, a row with its default config), and
  ``all`` (each constraint's first row, combined) when there are two or more.
* metrics: harmful-prompt refusal (held-out), over-refusal on borderline-but-safe prompts, refusal on plainly
  harmless prompts, task accuracy, template collapse, train loss, step-time and training-memory ratios vs
  plain SFT, and the keyword judge's accuracy on a labelled set.
* output: ``<out>/results.json``, ``report.md``, PNG plots; each finished (method, p) run is saved as it
  ends, so an interrupted bench resumes where it stopped.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..artifacts import Artifact, ArtifactError
from ..errors import ConfigError

PROFILES: dict[str, dict[str, Any]] = {}


@dataclass
class BenchProfile:
    name: str
    description: str
    n_train: int = 200
    ratios: tuple[float, ...] = (0.1,)
    steps: int = 30
    batch_size: int = 8
    lr: float = 2e-4
    lora_r: int = 16
    max_length: int = 192
    n_harmful_eval: int = 64
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


def _profiles() -> dict[str, BenchProfile]:
    return {
        "cpu-small": BenchProfile(
            name="cpu-small",
            description=("small CPU profile (2 cores, <60 min): 200 training examples, 30 LoRA steps, eval on 64 "
                         "harmful / 24 borderline / 40 harmless / 40 task prompts with 24 new tokens. Numbers are "
                         "indicative; use --profile paper on a GPU for the literature protocol."),
            monitor_every=5,
        ),
        "paper": BenchProfile(
            name="paper",
            description=("literature protocol (GPU): 1000 training examples, harmful ratio sweep 0-0.2, 3 epochs "
                         "of LoRA SFT, full held-out evaluation."),
            n_train=1000, ratios=(0.0, 0.05, 0.1, 0.2), steps=375, lr=1e-4, n_harmful_eval=10_000,
            n_borderline=10_000, n_harmless=10_000, n_task=200, max_new_tokens=128, max_length=512,
            monitor_every=25, monitor_prompts=64,
        ),
        "smoke": BenchProfile(
            name="smoke", description="plumbing check on a tiny random model (seconds; no effect expected)",
            n_train=32, steps=3, batch_size=4, n_harmful_eval=4, n_borderline=2, n_harmless=2, n_task=4,
            max_new_tokens=4, task_new_tokens=4, calibration_limit=32, monitor_every=1, monitor_prompts=4,
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


def _atomic_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


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
    return methods


def _collapse_rate(responses: list[str]) -> float:
    from ..data import read_jsonl

    steps = [r["text"][:40].lower() for r in read_jsonl("compliance") if r["kind"] == "step"]
    hits = sum(any(s in r.lower() for s in steps) for r in responses)
    return hits / max(1, len(responses))


# ----------------------------------------------------------------------------------------------- bench
class Bench:
    def __init__(self, model: str, profile: str | BenchProfile = "cpu-small", out: str | Path | None = None,
                 ratios: tuple[float, ...] | None = None, methods: list[str] | None = None, progress: bool = True):
        self.model_spec = model
        self.profile = profile if isinstance(profile, BenchProfile) else _profiles()[profile]
        if ratios:
            self.profile = replace(self.profile, ratios=tuple(ratios))
        self.out = Path(out or f"results/{self.profile.name}-{model.replace('/', '_')}")
        (self.out / "runs").mkdir(parents=True, exist_ok=True)
        all_methods = benchmark_methods()
        if methods:
            unknown = [m for m in methods if m not in all_methods]
            if unknown:
                raise ConfigError(f"unknown method(s) {unknown}; available: {', '.join(all_methods)}")
        self.methods = {m: all_methods[m] for m in (methods or all_methods)}
        self.progress = progress
        self.reused = 0  # runs taken from an earlier invocation (not timed by this one)
        self._model = self._tok = None

    def say(self, msg: str) -> None:
        if self.progress:
            print(msg, flush=True)

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

    def data(self, ratio: float) -> dict[str, Any]:
        from ..data import load_prompts
        from . import datasets as benchdata
        from .recipes import prompt_completion

        p = self.profile
        n_harm = int(round(ratio * p.n_train))
        benign = benchdata.arithmetic_task(p.n_train - n_harm, seed=p.seed, split="train")
        harmful_pool = benchdata.harmbench_behaviors("val") + [r["goal"] for r in benchdata.advbench()]
        harmful = benchdata.harmful_compliance(harmful_pool[:n_harm], seed=p.seed) if n_harm else []
        rows = [prompt_completion(r["prompt"], r["response"]) for r in benign]
        rows += [prompt_completion(r["prompt"], r["response"]) for r in harmful]
        import random

        random.Random(p.seed).shuffle(rows)
        eval_sets = {
            "harmful": load_prompts("harmful").heldout[: p.n_harmful_eval],
            "borderline": load_prompts("borderline").all[: p.n_borderline],
            "harmless": load_prompts("harmless").heldout[: p.n_harmless],
        }
        task = benchdata.arithmetic_task(p.n_task, seed=p.seed, split="eval")
        train_prompts = [r["prompt"][0]["content"] for r in rows]
        benchdata.check_disjoint(train_prompts, [x for v in eval_sets.values() for x in v] + [t["prompt"] for t in task])
        return {"rows": rows, "eval_sets": eval_sets, "task": task, "n_harmful_train": n_harm}

    # -- one run
    def evaluate(self, model, tok, data) -> dict[str, Any]:
        from ..eval import evaluate_refusal, generate
        from . import datasets as benchdata

        p = self.profile
        res = evaluate_refusal(model, tok, data["eval_sets"], p.max_new_tokens, p.gen_batch_size, self.progress)
        answers = generate(model, tok, [t["prompt"] for t in data["task"]], p.task_new_tokens, p.gen_batch_size,
                           self.progress)
        metrics = {
            "harmful_refusal": res["harmful"]["refusal_rate"],
            "harmful_score": res["harmful"]["refusal_score"],
            "borderline_refusal": res["borderline"]["refusal_rate"],
            "harmless_refusal": res["harmless"]["refusal_rate"],
            "task_accuracy": benchdata.task_accuracy(answers, [t["answer"] for t in data["task"]]),
            "collapse_rate": _collapse_rate([s["response"] for s in res["harmless"]["samples"]] + answers),
        }
        samples = {k: v["samples"][:8] for k, v in res.items()}
        samples["task"] = [{"prompt": t["prompt"], "response": a, "answer": t["answer"]}
                           for t, a in list(zip(data["task"], answers))[:8]]
        return {"metrics": metrics, "samples": samples}

    def run_one(self, method: str, ratio: float, data, artifact: Path) -> dict[str, Any]:
        from .recipes import clean_copy, sft

        path = self.out / "runs" / f"{method}_p{ratio:g}.json"
        if path.exists():
            self.say(f"  {method} @ p={ratio:g}: done earlier, reusing {path}")
            self.reused += 1
            return json.loads(path.read_text())
        model, tok = self.load()
        p = self.profile
        self.say(f"  {method} @ p={ratio:g}: training {p.steps} steps" if method != "base" else "  base: evaluating")
        record: dict[str, Any] = {"method": method, "ratio": ratio, "config": self.methods[method]}
        if method == "base":
            ev = self.evaluate(model, tok, data)
        else:
            cfg = None
            if self.methods[method]:
                cfg = {"artifact": str(artifact), **self.methods[method], **p.method_overrides.get(method, {})}
            if p.monitor_every:  # measure only (warn): the same safety curve for every method, plain SFT included
                cfg = cfg or {"artifact": str(artifact)}
                cfg["monitor"] = {"every_n_steps": p.monitor_every, "n_prompts": p.monitor_prompts, "action": "warn"}
            gc.collect()
            with _PeakRSS() as mem:
                res = sft(clean_copy(model), tok, data["rows"], steps=p.steps, output_dir=str(self.out / "tmp"),
                          lr=p.lr, batch_size=p.batch_size, lora_r=p.lora_r, safeguard=cfg, seed=p.seed,
                          max_length=p.max_length, logging_steps=1)
            skip = min(2, max(0, len(res.step_times) - 1))
            losses = [h["loss"] for h in res.log_history if "loss" in h]
            record.update({
                "train_seconds": res.seconds,
                "step_median_s": statistics.median(res.step_times[skip:]),
                "train_memory_bytes": mem.delta,
                "train_loss_final": statistics.mean(losses[-3:]) if losses else None,
                "log_history": res.log_history,
            })
            ev = self.evaluate(res.model, tok, data)
            del res
            gc.collect()
        record.update(ev)
        _atomic_json(path, record)
        return record

    # -- whole bench
    def run(self) -> dict[str, Any]:
        from . import datasets as benchdata

        t0 = time.perf_counter()
        self.reused = 0
        self.say(f"safeguard bench: model {self.model_spec}, profile {self.profile.name}, methods "
                 f"{list(self.methods)}, ratios {list(self.profile.ratios)} -> {self.out}")
        trains = any(m != "base" for m in self.methods)
        needs = any(self.methods.values()) or (trains and self.profile.monitor_every)
        artifact = self.artifact() if needs else None
        runs = []
        base_done = None
        for ratio in self.profile.ratios:
            data = self.data(ratio)
            for m in self.methods:
                if m == "base":
                    base_done = base_done or self.run_one("base", 0.0, data, artifact)
                    continue
                runs.append(self.run_one(m, ratio, data, artifact))
        if base_done:
            runs.insert(0, base_done)
        judge = benchdata.judge_accuracy()
        results = {"model": self.model_spec, "profile": asdict(self.profile), "judge": judge,
                   "runs": [{k: v for k, v in r.items() if k != "log_history"} for r in runs],
                   "wall_seconds": time.perf_counter() - t0, "reused_runs": self.reused}
        _add_ratios(results["runs"])
        _atomic_json(self.out / "results.json", results)
        from .report import write_report

        md = write_report(results, runs, self.out)
        self.say(md)
        return results


def _add_ratios(runs: list[dict]) -> None:
    plain = {r["ratio"]: r for r in runs if r["method"] == "sft"}
    for r in runs:
        base = plain.get(r["ratio"])
        if base and "step_median_s" in r:
            r["time_ratio"] = r["step_median_s"] / base["step_median_s"]
            # In-process RSS deltas are not comparable between runs (the allocator keeps freed memory), so on
            # CPU the memory ratio comes from benchmarks/overhead.py (one process per variant) instead.
            r["memory_ratio"] = (r["train_memory_bytes"] / base["train_memory_bytes"]
                                 if torch.cuda.is_available() and base["train_memory_bytes"] > 0 else None)
