"""One prepared GPU check: every constraint trained on CUDA in the precisions and set-ups CPU tests cannot reach.

    bash scripts/gpu_check.sh                    # on the GPU machine (installs the carried wheels, then runs this)
    python scripts/gpu_check.py --cpu-dry-run    # here: tiny model, 2 steps per variant, CUDA-only variants skipped

Variants (``--list`` prints them; ``--only`` takes comma-separated names or shell patterns such as ``qlora/*``):

* ``bf16-lora/<constraint>``: a tiny random Qwen2 in bf16 + LoRA, 10 steps, plain and every constraint; penalty
  metric and the trained adapter's difference from the plain run's (same seed, same data).
* ``fp16/procon``: the tiny model (fp32 weights) with fp16 mixed precision + ProCon.
* ``qlora/*``: the tiny model loaded 4-bit (bitsandbytes nf4) + LoRA with ProCon, adaptive KL and GuardSpace
  (``residual: offset``) on an artifact calibrated on the 4-bit model, and ProCon on the artifact of the unquantized
  model (what a user who calibrated first would do).
* ``timing/*``: a 0.5B-shaped Qwen2 (random bf16 weights) + LoRA r=16, plain vs ProCon, CWAC, adaptive KL and
  GuardSpace, alternating plain/variants in this process; step-time ratio = median step time (after warm-up) of the
  variant / plain's, peak memory ratio = ``torch.cuda.max_memory_allocated`` of the variant / plain's.
* ``deepspeed/zero2``, ``deepspeed/zero3``: 1-GPU DeepSpeed through NCCL (torchrun child), tiny model, LoRA + ProCon.

Each variant runs in its own try/except (DeepSpeed: its own process) against a per-variant estimate and one global
deadline (``--budget-s``); what cannot run says why ("skipped: ..."). The table (markdown) and a JSON record are
written to ``$OUT`` if set, else ``--out``, after every variant, so a run cut short still leaves its rows.

"Penalty active": the constraint's logged ``safeguard/penalty`` is finite at every step and nonzero at some step;
GuardSpace and the monitor add no loss term ("n/a", their own metric in the notes).

Helpers for scripts/gpu_check.sh / gpu_wheels.sh: ``--wheel-specs`` (the list in scripts/gpu_wheels.txt),
``--plan-install DIR`` (which carried files to install here), ``--write-metadata SITE`` (entry points of this
checkout when it is imported from PYTHONPATH instead of being pip-installed).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import fnmatch
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEEL_LIST = ROOT / "scripts" / "gpu_wheels.txt"
PYPROJECT = ROOT / "pyproject.toml"

CONSTRAINTS = ("procon", "cwac", "adaptive_kl", "guardspace", "monitor")
TIMED = ("procon", "cwac", "adaptive_kl", "guardspace")
NO_LOSS_TERM = {"guardspace": "guardspace_update_norm", "monitor": "monitor_alerts"}
TINY_TARGETS = ["q_proj", "v_proj", "up_proj"]
TINY_R = 2  # GuardSpace on the tiny model (hidden 64) finds null spaces of 2+ dims, not 4
ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# the 0.5B-shaped model of the timing rows (Qwen2.5-0.5B's shape, random weights)
QWEN05_SHAPE = {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                "num_attention_heads": 14, "num_key_value_heads": 2, "tie_word_embeddings": True}

# settings per constraint in the correctness rows (tiny model) and in the timing rows
TINY_CFG = {
    "procon": {"weight": 100.0, "warmup_ratio": 0.0},
    "cwac": {"sae_weight": 10.0},
    "adaptive_kl": {"risk": "probe"},
    "guardspace": {"target_modules": TINY_TARGETS},
    "monitor": {"every_n_steps": 5, "n_prompts": 4, "action": "warn"},
}
TIMING_CFG = {
    "procon": {"weight": 100.0},
    "cwac": {},
    "adaptive_kl": {"risk": "constant", "risk_options": {"score": 5}},  # a reference forward on every batch
    "guardspace": {"null_energy": 0.01},
}
PACKAGES = ("torch", "transformers", "peft", "accelerate", "trl", "datasets", "pydantic", "bitsandbytes", "deepspeed")


# ---------------------------------------------------------------------------------------------------- wheel list
@dataclasses.dataclass(frozen=True)
class WheelSpec:
    name: str
    version: str
    min_version: str | None = None  # installed there but older than this: install the carried one
    build: bool = False  # no wheel on PyPI: built here from the source tarball (DS_BUILD_OPS=0)
    optional: bool = False  # may be left out of .whl/ (its variants then skip)

    @property
    def key(self) -> str:
        return norm_name(self.name)

    @property
    def pin(self) -> str:
        return f"{self.name}=={self.version}"


def norm_name(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def read_wheel_list(path: Path | str = WHEEL_LIST) -> list[WheelSpec]:
    specs = []
    for n, raw in enumerate(Path(path).read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        pin, *opts = line.split()
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][A-Za-z0-9.+!-]*)", pin)
        if m is None:
            raise ValueError(f"{path}:{n}: expected 'name==version [options]', got {raw.strip()!r}")
        kw: dict = {}
        for o in opts:
            if o.startswith("min="):
                kw["min_version"] = o[4:]
            elif o in ("build", "optional"):
                kw[o] = True
            else:
                raise ValueError(f"{path}:{n}: unknown option {o!r} (min=X, build, optional)")
        specs.append(WheelSpec(m.group(1), m.group(2), **kw))
    keys = [s.key for s in specs]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ValueError(f"{path}: listed twice: {', '.join(dup)} (two versions stop the whole install)")
    return specs


def version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v.split("+", 1)[0])[:4])


def installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def carried_files(spec: WheelSpec, folder: Path) -> list[Path]:
    """The files in ``folder`` for ``spec`` (wheels first, then a source tarball)."""
    out = []
    for f in sorted(Path(folder).glob("*")):
        if f.suffix == ".whl":
            parts = f.name.split("-")
        elif f.name.endswith(".tar.gz"):
            parts = f.name[: -len(".tar.gz")].rsplit("-", 1)
        else:
            continue
        if len(parts) >= 2 and norm_name(parts[0]) == spec.key and parts[1] == spec.version:
            out.append(f)
    return sorted(out, key=lambda f: f.suffix != ".whl")


def plan_install(specs: list[WheelSpec], folder: Path, installed=installed_version) -> tuple[list[Path], list[str]]:
    """Carried files to install: a package not installed, or older than its ``min=``. Returns (files, notes)."""
    files, notes = [], []
    for s in specs:
        have = installed(s.name)
        if have is not None and (s.min_version is None or version_tuple(have) >= version_tuple(s.min_version)):
            notes.append(f"{s.name}: {have} is installed")
            continue
        found = carried_files(s, folder)
        why = "not installed" if have is None else f"{have} is older than {s.min_version}"
        if not found:
            notes.append(f"{s.name}: {why}, and {folder} holds no {s.pin}"
                         + (" (optional: its variants skip)" if s.optional else " (run scripts/gpu_wheels.sh)"))
            continue
        notes.append(f"{s.name}: {why}: installing {found[0].name}")
        files.append(found[0])
    return files, notes


# ------------------------------------------------------------------------------------------ package metadata
def entry_point_groups(pyproject: Path = PYPROJECT) -> dict[str, dict[str, str]]:
    """``[project.entry-points."safeguard_plugin.*"]`` tables of pyproject.toml (a line parser: no tomllib on 3.10)."""
    groups: dict[str, dict[str, str]] = {}
    current = None
    for raw in Path(pyproject).read_text().splitlines():
        line = raw.strip()
        if line.startswith("["):
            m = re.fullmatch(r'\[project\.entry-points\."([^"]+)"\]', line)
            current = m.group(1) if m and m.group(1).startswith("safeguard_plugin.") else None
            if current:
                groups[current] = {}
        elif current and "=" in line and not line.startswith("#"):
            k, v = (x.strip() for x in line.split("=", 1))
            groups[current][k] = v.strip('"')
    return groups


def project_version(pyproject: Path = PYPROJECT) -> str:
    m = re.search(r'^version\s*=\s*"([^"]+)"', Path(pyproject).read_text(), re.M)
    return m.group(1) if m else "0"


def write_metadata(site: Path, pyproject: Path = PYPROJECT) -> Path:
    """A ``safeguard_plugin-<v>.dist-info`` in ``site`` carrying this checkout's entry points (the registry finds the
    built-in constraints through them)."""
    d = Path(site) / f"safeguard_plugin-{project_version(pyproject)}.dist-info"
    d.mkdir(parents=True, exist_ok=True)
    (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: safeguard-plugin\nVersion: {project_version(pyproject)}\n")
    eps = "".join(f"[{g}]\n" + "".join(f"{k} = {v}\n" for k, v in names.items()) + "\n"
                  for g, names in entry_point_groups(pyproject).items())
    (d / "entry_points.txt").write_text(eps)
    return d


def ensure_metadata(site: Path) -> str:
    if importlib.metadata.entry_points(group="safeguard_plugin.constraints"):
        return "safeguard_plugin entry points found"
    return f"wrote {write_metadata(site)}"


# ------------------------------------------------------------------------------------------------ variants
@dataclasses.dataclass
class Env:
    cuda: bool
    bf16: bool
    device: str
    packages: dict[str, str | None]  # version, or None when missing / not importable
    errors: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    group: str
    constraint: str | None
    needs: tuple[str, ...]
    est_s: float  # on the GPU; the deadline check skips a variant that no longer fits


@dataclasses.dataclass
class Result:
    variant: str
    status: str  # ran | failed | skipped | partial
    penalty: str = "–"
    time_ratio: float | None = None
    mem_ratio: float | None = None
    notes: str = ""
    data: dict = dataclasses.field(default_factory=dict)


def all_variants() -> list[Variant]:
    train = ("trl", "peft", "datasets")
    v = [Variant("bf16-lora/plain", "bf16", None, train, 8)]
    v += [Variant(f"bf16-lora/{c}", "bf16", c, train, 10) for c in CONSTRAINTS]
    v += [Variant("fp16/procon", "fp16", "procon", ("cuda", *train), 10)]
    q = ("cuda", "bitsandbytes", *train)
    v += [Variant("qlora/procon-unquantized-artifact", "qlora", "procon", q, 12),
          Variant("qlora/procon", "qlora", "procon", q, 15),
          Variant("qlora/adaptive_kl", "qlora", "adaptive_kl", q, 10),
          Variant("qlora/guardspace-offset", "qlora", "guardspace", q, 10)]
    # timing: plain's estimate holds the 0.5B model's build and calibration
    v += [Variant("timing/plain", "timing", None, ("cuda-or-dry-run", *train), 45)]
    v += [Variant(f"timing/{c}", "timing", c, ("cuda-or-dry-run", *train), 25) for c in TIMED]
    v += [Variant(f"deepspeed/zero{s}", "deepspeed", "procon", ("cuda-or-ds-on-cpu", "deepspeed", *train), 75)
          for s in (2, 3)]
    return v


def skip_reason(v: Variant, env: Env, args) -> str | None:
    if args.only and not any(fnmatch.fnmatchcase(v.name, p) for p in args.only):
        return "not selected (--only)"
    if v.group == "bf16" and env.cuda and not env.bf16:
        return "this GPU has no bf16"
    for need in v.needs:
        if need == "cuda" and not env.cuda:
            return {"fp16": "needs CUDA (fp16 mixed precision trains on GPU only)",
                    "qlora": "needs CUDA (bitsandbytes 4-bit training)"}.get(v.group, "needs CUDA")
        if need == "cuda-or-dry-run" and not env.cuda and not args.cpu_dry_run:
            return "needs CUDA (the 0.5B-shaped model; --cpu-dry-run times the tiny model instead)"
        if need == "cuda-or-ds-on-cpu" and not env.cuda and not args.ds_on_cpu:
            return "needs CUDA (NCCL); --cpu-dry-run --ds-on-cpu runs it with gloo"
        if need in PACKAGES and env.packages.get(need) is None:
            err = env.errors.get(need)
            return f"{need} not importable: {err}" if err else f"{need} not installed"
    if v.group == "timing" and v.constraint and args.repeats < 1:
        return "--repeats 0"
    return None


# --------------------------------------------------------------------------------------------------- table
def fmt_ratio(x: float | None) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.2f}"


def _cell(text: str, limit: int = 220) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def format_table(results: list[Result]) -> str:
    rows = ["| variant | result | penalty active | step-time ratio | peak CUDA memory ratio | notes |",
            "|---|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r.variant} | {r.status} | {_cell(r.penalty)} | {fmt_ratio(r.time_ratio)} | "
                    f"{fmt_ratio(r.mem_ratio)} | {_cell(r.notes)} |")
    return "\n".join(rows)


def penalty_summary(log_history: list[dict], constraint: str | None) -> tuple[str, str]:
    """(penalty-active cell, note) from a trainer's log history (``logging_steps=1``)."""
    if constraint is None:
        return "–", ""
    if constraint in NO_LOSS_TERM:
        key = f"safeguard/{NO_LOSS_TERM[constraint]}"
        vals = [h[key] for h in log_history if key in h]
        return "n/a (no loss term)", (f"{NO_LOSS_TERM[constraint]} last {vals[-1]:.3g}" if vals else f"no {key} logged")
    vals = [float(h["safeguard/penalty"]) for h in log_history if "safeguard/penalty" in h]
    if not vals:
        return "no (not logged)", "no safeguard/penalty in the log"
    bad = [v for v in vals if not math.isfinite(v)]
    if bad:
        return "no (non-finite)", f"{len(bad)}/{len(vals)} logged penalties non-finite"
    peak = max(abs(v) for v in vals)
    return ("yes" if peak > 0 else "no (always 0)"), f"max penalty {peak:.3g} over {len(vals)} logs"


# ------------------------------------------------------------------------------------------------ training
def chat_rows(n: int, answer_words: int = 0) -> list[dict]:
    from safeguard_plugin.data import load_prompts

    filler = " ".join(("The answer is explained step by step here. " * (answer_words // 8 + 1)).split()[:answer_words])
    harmless = load_prompts("harmless").all
    out = []
    for i in range(n):
        a, b = i % 8, (i // 8) % 4
        prompt = harmless[i % len(harmless)] if answer_words else f"What is {a} plus {b}?"
        out.append({"prompt": [{"role": "user", "content": prompt}],
                    "completion": [{"role": "assistant", "content": (filler or f"{a} plus {b} is {a + b}.")}]})
    return out


def _callbacks(stop_at: float, cuda: bool):
    from transformers import TrainerCallback

    sync = (lambda: __import__("torch").cuda.synchronize()) if cuda else (lambda: None)

    class Begin(TrainerCallback):
        t0 = 0.0

        def on_step_begin(self, args, state, control, **kw):
            sync()
            Begin.t0 = time.perf_counter()

    class End(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.stopped_at: int | None = None

        def on_step_end(self, args, state, control, **kw):
            sync()
            self.times.append(time.perf_counter() - Begin.t0)
            if time.monotonic() > stop_at and state.global_step < state.max_steps:
                control.should_training_stop = True
                self.stopped_at = state.global_step

    return Begin(), End()


def train(model, tok, rows, *, steps: int, precision: str, safeguard: dict | None, lora_r: int | None,
          targets, batch: int, max_length: int, stop_at: float, lr: float = 1e-3) -> dict:
    """One SFTTrainer run; returns its log history, step times and trainable weights."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from safeguard_plugin.integrations.trl import SafeguardCallback

    cuda = torch.cuda.is_available()
    args = SFTConfig(output_dir=tempfile.mkdtemp(prefix="gpu-check-"), max_steps=steps, per_device_train_batch_size=batch,
                     learning_rate=lr, logging_steps=1, report_to=[], use_cpu=not cuda, bf16=precision == "bf16",
                     fp16=precision == "fp16", save_strategy="no", seed=0, data_seed=0, disable_tqdm=True,
                     lr_scheduler_type="constant", warmup_steps=0, dataloader_num_workers=0, max_length=max_length)
    peft = (LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0, target_modules=list(targets),
                       task_type="CAUSAL_LM") if lora_r else None)
    begin, end = _callbacks(stop_at, cuda)
    cb = SafeguardCallback(safeguard) if safeguard else None
    torch.manual_seed(0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=peft, callbacks=[begin, *([cb] if cb else []), end])
    quiet(trainer)
    t0 = time.perf_counter()
    trainer.train()
    out = {"log": trainer.state.log_history, "times": end.times, "stopped_at": end.stopped_at,
           "steps": trainer.state.global_step, "train_s": time.perf_counter() - t0,
           "weights": {n: p.detach().float().cpu().clone() for n, p in trainer.model.named_parameters()
                       if p.requires_grad}}
    if cb is not None and cb.engine is not None:
        out["stop_reason"] = getattr(cb.engine, "stop_reason", None)
    del trainer
    return out


def quiet(trainer) -> None:
    """No per-step log dict on stdout (the tool returns the output's last 12,000 characters; the table matters)."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)


def max_abs_diff(a: dict, b: dict) -> float | None:
    common = [k for k in a if k in b and a[k].shape == b[k].shape]
    if not common:
        return None
    return max(float((a[k] - b[k]).abs().max()) for k in common)


def free_cuda() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_bytes() -> int | None:
    import torch

    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


# --------------------------------------------------------------------------------------------------- runner
class Runner:
    def __init__(self, args, env: Env):
        self.args, self.env = args, env
        self.start = time.monotonic()
        self.deadline = self.start + args.budget_s
        self.results: list[Result] = []
        self.out = Path(os.environ.get("OUT") or args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.steps = args.steps if args.steps is not None else (2 if args.cpu_dry_run else 10)
        self.art: dict[str, Path] = {}
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        self.plain: dict[str, dict] = {}

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def scale(self, est: float) -> float:
        return est * (0.5 if self.args.cpu_dry_run else 1.0)

    # -- output
    def header(self) -> str:
        pk = ", ".join(f"{k} {v or '–'}" for k, v in self.env.packages.items())
        mode = "CPU dry run (tiny model only)" if self.args.cpu_dry_run else "full"
        return (f"gpu_check ({mode}): device {self.env.device}; {self.steps} steps per run; "
                f"{time.monotonic() - self.start:.0f} s of {self.args.budget_s:.0f} s used\n\n{pk}")

    def write(self) -> None:
        md = self.header() + "\n\n" + format_table(self.results) + "\n"
        (self.out / "gpu_check.md").write_text(md)
        rec = {"env": dataclasses.asdict(self.env), "args": {k: v for k, v in vars(self.args).items()},
               "elapsed_s": time.monotonic() - self.start, "steps": self.steps,
               "results": [dataclasses.asdict(r) for r in self.results]}
        (self.out / "gpu_check.json").write_text(json.dumps(rec, indent=1, default=str))

    def add(self, r: Result) -> Result:
        self.results.append(r)
        line = f"[{time.monotonic() - self.start:6.1f}s] {r.variant}: {r.status}"
        print(line + (f" ({_cell(r.notes, 300)})" if r.notes else ""), flush=True)
        self.write()
        return r

    # -- one variant
    def run(self, v: Variant, fn, *a, reserve: float = 0.0) -> Result:
        why = skip_reason(v, self.env, self.args)
        if why is None and self.remaining() - reserve < self.scale(v.est_s):
            why = f"budget: {max(0.0, self.remaining()):.0f} s left, needs ~{self.scale(v.est_s):.0f} s"
        if why is not None:
            return self.add(Result(v.name, "skipped", notes=why))
        print(f"[{time.monotonic() - self.start:6.1f}s] {v.name} ...", flush=True)
        try:
            r = fn(v, *a)
        except Exception as e:  # noqa: BLE001 - every variant reports, none stops the others
            tb = traceback.format_exc()
            sys.stderr.write(tb)
            r = Result(v.name, "failed", notes=f"{type(e).__name__}: {e}", data={"traceback": tb[-4000:]})
        finally:
            try:
                free_cuda()
            except Exception:  # noqa: BLE001
                pass
        return self.add(r)

    # -- artifacts
    def artifact(self, key: str, model_fn, tok, constraints, configs: dict | None = None,
                 harmful_limit: int | None = 64) -> Path:
        """The artifact of model ``key``, calibrated (or extended) in-process for ``constraints``."""
        out, done = self.art.get(key, (self.tmp / f"art-{key}", set()))
        todo = sorted(set(constraints) - done)
        if todo:
            from safeguard_plugin.calibration import calibrate
            from safeguard_plugin.data import load_prompts

            t0 = time.perf_counter()
            model = model_fn() if callable(model_fn) else model_fn
            # an artifact of the same model and prompts in `out` is extended with what it lacks
            calibrate(model, tok, load_prompts("harmful", limit=harmful_limit), load_prompts("harmless", limit=64),
                      out, model_id=key, constraints=sorted(done | set(todo)), progress=False,
                      constraint_configs=configs)
            print(f"    calibrated {key} for {', '.join(todo)} in {time.perf_counter() - t0:.0f} s", flush=True)
            self.art[key] = (out, done | set(todo))
        return out

    def tiny(self, dtype=None):
        import torch

        from safeguard_plugin.testing import tiny_model

        m = tiny_model()
        if dtype is not None:
            m = m.to(dtype)
        return m.cuda() if torch.cuda.is_available() else m

    def tok(self):
        from safeguard_plugin.testing import tiny_tokenizer

        if not hasattr(self, "_tok"):
            self._tok = tiny_tokenizer()
        return self._tok

    def result_of(self, v: Variant, res: dict, plain: dict | None, ratio_time: bool = False) -> Result:
        pen, note = penalty_summary(res["log"], v.constraint)
        notes = [note] if note else []
        if plain is not None and v.constraint is not None:
            d = max_abs_diff(res["weights"], plain["weights"])
            if d is not None:
                notes.append(f"max |Δw| vs plain {d:.2e}")
        if res.get("stop_reason"):
            notes.append(f"stop: {res['stop_reason']}")
        status = "ran"
        if res["steps"] < self.steps:
            status = "partial"
            notes.append(f"stopped by the deadline after {res['steps']}/{self.steps} steps")
        mem = (res["peak"] / plain["peak"]) if plain is not None and res.get("peak") and plain.get("peak") else None
        if res.get("peak"):
            notes.append(f"peak {res['peak'] / 2**20:.0f} MiB")
        return Result(v.name, status, pen, None, mem, "; ".join(notes),
                      data={"log": res["log"], "step_times": res["times"]})

    # -- groups
    def small_run(self, v: Variant, precision: str, model_fn, art_fn, cfg: dict | None) -> Result:
        """A tiny-model run; bf16 rows compare with bf16-lora/plain (weights, memory), the others note memory only."""
        free_cuda()
        model = model_fn()
        safeguard = None
        if v.constraint is not None:
            safeguard = {"artifact": str(art_fn(v.constraint)), v.constraint: dict(cfg or {})}
        res = train(model, self.tok(), chat_rows(32), steps=self.steps, precision=precision, safeguard=safeguard,
                    lora_r=TINY_R, targets=TINY_TARGETS, batch=4, max_length=64, stop_at=self.deadline - 5)
        res["peak"] = peak_bytes()
        del model
        if v.name == "bf16-lora/plain":
            self.plain["bf16"] = res
        same = v.group == "bf16"
        r = self.result_of(v, res, self.plain.get("bf16") if same else None)
        plain_peak = self.plain.get("bf16", {}).get("peak")
        if not same and plain_peak and res.get("peak"):
            r.notes += f"; peak / bf16-lora/plain's {res['peak'] / plain_peak:.2f}"
        return r

    def group_bf16(self, vs: list[Variant]) -> None:
        import torch

        wanted = [v.constraint for v in vs if v.constraint and skip_reason(v, self.env, self.args) is None]

        def art(c):
            return self.artifact("tiny-bf16", lambda: self.tiny(torch.bfloat16), self.tok(), wanted or [c])

        for v in vs:
            self.run(v, self.small_run, "bf16", lambda: self.tiny(torch.bfloat16), art, TINY_CFG.get(v.constraint))

    def group_fp16(self, vs: list[Variant]) -> None:
        import torch

        def art(c):  # the fp32 tiny model's own artifact (fp16 trains fp32 weights under autocast)
            return self.artifact("tiny-fp32", lambda: self.tiny(torch.float32), self.tok(), [c])

        for v in vs:
            self.run(v, self.small_run, "fp16", lambda: self.tiny(torch.float32), art, TINY_CFG.get(v.constraint))

    def qlora_model(self):
        import torch
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        folder = self.tmp / "tiny-fp32"
        if not folder.exists():
            from safeguard_plugin.testing import tiny_model

            tiny_model().save_pretrained(folder)
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
        return AutoModelForCausalLM.from_pretrained(folder, quantization_config=q, dtype=torch.bfloat16,
                                                    device_map={"": 0})

    def group_qlora(self, vs: list[Variant]) -> None:
        import torch

        wanted = [v.constraint for v in vs if v.constraint and not v.name.endswith("unquantized-artifact")]
        cfgs = {"guardspace": {"residual": "offset", "target_modules": TINY_TARGETS}}

        def art_unquantized(c):  # calibrated on the unquantized model (bf16), as `safeguard calibrate` would
            return self.artifact("tiny-bf16", lambda: self.tiny(torch.bfloat16), self.tok(), [c])

        def art_4bit(c):
            return self.artifact("tiny-4bit", self.qlora_model, self.tok(), wanted or [c])

        for v in vs:
            art = art_unquantized if v.name.endswith("unquantized-artifact") else art_4bit
            cfg = cfgs.get(v.constraint, TINY_CFG.get(v.constraint))
            self.run(v, self.small_run, "bf16", self.qlora_model, art, cfg)

    def group_timing(self, vs: list[Variant], reserve: float) -> None:
        """Alternating plain / variants on one base model (deep-copied per run) in this process."""
        plain_v = next(v for v in vs if v.constraint is None)
        reasons = {v.name: skip_reason(v, self.env, self.args) for v in vs if v is not plain_v}
        chosen = [v for v in vs if v is not plain_v and reasons[v.name] is None]
        # the baseline runs whenever a constrained timing variant does (--only need not name it)
        why = skip_reason(plain_v, self.env, argparse.Namespace(**{**vars(self.args), "only": None}))
        if why is None and not chosen:
            why = skip_reason(plain_v, self.env, self.args) or "no constrained timing variant runs"
        if why is not None:
            for v in vs:
                self.add(Result(v.name, "skipped", notes=reasons.get(v.name) or why))
            return
        dry = self.args.cpu_dry_run and not self.env.cuda
        steps = self.steps
        skip = self.args.skip if not dry else 0
        if steps - skip < 1:
            skip = 0
        est = sum(self.scale(v.est_s) for v in [plain_v, *chosen]) * max(1, self.args.repeats) / 2
        if self.remaining() - reserve < est:
            for v in vs:
                self.add(Result(v.name, "skipped", notes=f"budget: {max(0.0, self.remaining() - reserve):.0f} s left "
                                                         f"for timing, needs ~{est:.0f} s"))
            return
        t0 = time.perf_counter()
        try:
            base, label = self.timing_model(dry)
            # dry run: the tiny bf16 model's artifact (extended); else GuardSpace's widest input (4864) wants
            # every harmful prompt (the train split holds more tokens than that)
            art = self.artifact("tiny-bf16" if dry else "timing", base, self.tok(), [v.constraint for v in chosen],
                                harmful_limit=64 if dry else None)
        except Exception as e:  # noqa: BLE001
            tb = traceback.format_exc()
            sys.stderr.write(tb)
            for v in vs:
                self.add(Result(v.name, "failed", notes=f"timing model / calibration: {type(e).__name__}: {e}",
                                data={"traceback": tb[-4000:]}))
            return
        setup_s = time.perf_counter() - t0
        rows = chat_rows(self.args.batch * (steps + 1), answer_words=48)
        runs: dict[str, list[dict]] = {v.name: [] for v in [plain_v, *chosen]}
        errors: dict[str, str] = {}
        order = [plain_v, *chosen]
        for rep in range(self.args.repeats):
            # plain, a, b, ... then reversed: a machine that drifts favours no variant
            seq = order if rep % 2 == 0 else order[::-1]
            for v in seq:
                if v.name in errors or (v is not plain_v and plain_v.name in errors):
                    continue
                if runs[v.name] and self.remaining() - reserve < self.scale(v.est_s):
                    continue  # one run of each done; the rest of the budget belongs to later groups
                free_cuda()
                model = copy.deepcopy(base)
                cfg = None
                if v.constraint is not None:
                    sec = dict(TIMING_CFG[v.constraint])
                    if dry and v.constraint == "guardspace":  # the tiny model's LoRA targets
                        sec["target_modules"] = TINY_TARGETS
                    cfg = {"artifact": str(art), v.constraint: sec}
                try:
                    res = train(model, self.tok(), rows, steps=steps, precision="bf16", safeguard=cfg,
                                lora_r=TINY_R if dry else 16, targets=TINY_TARGETS if dry else ALL_TARGETS,
                                batch=self.args.batch, max_length=256, stop_at=self.deadline - 5)
                    res["peak"] = peak_bytes()
                    res.pop("weights")
                    runs[v.name].append(res)
                    t = res["times"][skip:] or res["times"]
                    print(f"    repeat {rep + 1} {v.name}: median step {statistics.median(t) * 1e3:.1f} ms", flush=True)
                except Exception as e:  # noqa: BLE001
                    sys.stderr.write(traceback.format_exc())
                    errors[v.name] = f"{type(e).__name__}: {e}"
                finally:
                    del model
        base_runs = runs[plain_v.name]

        def med(rs):
            return statistics.median(statistics.median(r["times"][skip:] or r["times"]) for r in rs)

        def peak(rs):
            return max(r["peak"] for r in rs) if rs and rs[0]["peak"] else None

        pt, pm = (med(base_runs), peak(base_runs)) if base_runs else (None, None)
        for v in [plain_v, *chosen]:
            rs = runs[v.name]
            if v.name in errors or not rs:
                why = errors.get(v.name) or ("timing/plain failed: " + errors.get(plain_v.name, "no run")
                                             if not base_runs else "budget: no run fitted")
                self.add(Result(v.name, "failed" if v.name in errors or not base_runs else "skipped", notes=why))
                continue
            pen, note = penalty_summary(rs[0]["log"], v.constraint)
            t, m = med(rs), peak(rs)
            notes = [f"{label}; {len(rs)} run(s) × {steps} steps, median after {skip}; {t * 1e3:.1f} ms/step"]
            if m:
                notes.append(f"peak {m / 2**20:.0f} MiB")
            if v is plain_v:
                notes.append(f"model + calibration {setup_s:.0f} s")
            if note:
                notes.append(note)
            partial = any(r["steps"] < steps for r in rs)
            self.add(Result(v.name, "partial" if partial else "ran", pen if v.constraint else "–",
                            t / pt if pt else None, (m / pm) if m and pm else None, "; ".join(notes),
                            data={"step_times": [r["times"] for r in rs], "log": rs[0]["log"]}))
        for v in vs:  # the ones skipped before the loop
            if v is not plain_v and v not in chosen:
                self.add(Result(v.name, "skipped", notes=reasons[v.name]))
        del base
        free_cuda()

    def timing_model(self, dry: bool):
        import torch

        if dry:
            return self.tiny(torch.bfloat16), "tiny model (CPU dry run)"
        from transformers import AutoModelForCausalLM, Qwen2Config

        cfg = Qwen2Config(**QWEN05_SHAPE, max_position_embeddings=4096, pad_token_id=0, eos_token_id=2,
                          bos_token_id=None)
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        n = sum(p.numel() for p in model.parameters())
        return model, f"0.5B-shaped Qwen2 ({n / 1e6:.0f}M params, bf16)"

    def group_deepspeed(self, vs: list[Variant]) -> None:
        import torch

        def art(c):  # the fp32 tiny model's artifact, calibrated here (the child only reads it)
            return self.artifact("tiny-fp32", lambda: self.tiny(torch.float32), self.tok(), [c])

        for v in vs:
            self.run(v, self.ds_run, art)

    def ds_run(self, v: Variant, art_fn) -> Result:
        stage = int(v.name[-1])
        art = art_fn("procon")
        result = self.tmp / f"ds{stage}.json"
        limit = max(30.0, min(self.remaining() - 5, v.est_s * 2.5))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
               "--master_port", str(port), str(Path(__file__).resolve()), "--ds-child", str(stage), "--artifact",
               str(art), "--result", str(result), "--steps", str(self.steps)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        if not self.env.cuda:
            env["DS_ACCELERATOR"] = "cpu"
        t0 = time.perf_counter()
        # its own process group: on timeout the worker that torchrun started goes too (it holds the pipes)
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                             start_new_session=True)
        try:
            output, _ = p.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    output, _ = p.communicate(timeout=10)
                    break
                except subprocess.TimeoutExpired:
                    output = ""
            return Result(v.name, "failed", notes=f"timed out after {limit:.0f} s", data={"tail": (output or "")[-3000:]})
        wall = time.perf_counter() - t0
        if p.returncode != 0 or not result.exists():
            tail = output[-4000:]
            sys.stderr.write(tail + "\n")
            err = next((ln for ln in reversed(tail.splitlines()) if "Error" in ln or "error" in ln), tail[-200:])
            return Result(v.name, "failed", notes=f"exit {p.returncode}: {err.strip()}", data={"tail": tail})
        rec = json.loads(result.read_text())
        pen, note = penalty_summary(rec["log"], "procon")
        notes = [f"engine {rec['engine']}, backend {rec['backend']}, {rec['steps']} steps, {wall:.0f} s with start-up"]
        if note:
            notes.append(note)
        plain_peak = self.plain.get("bf16", {}).get("peak")
        mem = rec["peak"] / plain_peak if rec.get("peak") and plain_peak else None
        if rec.get("peak"):
            notes.append(f"peak {rec['peak'] / 2**20:.0f} MiB (ratio vs in-process bf16-lora/plain)")
        ok = rec["engine"] == "DeepSpeedEngine" and rec["steps"] == self.steps
        if rec["engine"] != "DeepSpeedEngine":
            notes.append("the model was not wrapped by DeepSpeed")
        return Result(v.name, "ran" if ok else "failed", pen, None, mem, "; ".join(notes), data={"log": rec["log"]})


def ds_child(args) -> int:
    """One DeepSpeed run (launched by torchrun): tiny model, LoRA + ProCon, ZeRO-<stage>; writes a JSON record."""
    import torch

    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    import deepspeed

    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    deepspeed.init_distributed(dist_backend=backend)
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from safeguard_plugin.integrations.trl import SafeguardCallback
    from safeguard_plugin.testing import tiny_model, tiny_tokenizer

    torch.manual_seed(0)
    model = tiny_model()
    ds = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
          "gradient_clipping": "auto", "bf16": {"enabled": "auto"}, "fp16": {"enabled": False},
          "zero_optimization": {"stage": args.ds_child}}
    if args.ds_child == 3:
        ds["zero_optimization"].update({"stage3_param_persistence_threshold": 0})
    sft = SFTConfig(output_dir=tempfile.mkdtemp(prefix="gpu-check-ds-"), max_steps=args.steps,
                    per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1, report_to=[], use_cpu=not cuda,
                    bf16=cuda, fp16=False, save_strategy="no", seed=0, data_seed=0, disable_tqdm=True,
                    lr_scheduler_type="constant", dataloader_num_workers=0, max_length=64, deepspeed=ds)
    peft = LoraConfig(r=TINY_R, lora_alpha=2 * TINY_R, target_modules=TINY_TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM")
    cb = SafeguardCallback({"artifact": args.artifact, "procon": TINY_CFG["procon"]})
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    tr = SFTTrainer(model=model, args=sft, train_dataset=Dataset.from_list(chat_rows(32)),
                    processing_class=tiny_tokenizer(), peft_config=peft, callbacks=[cb])
    quiet(tr)
    tr.train()
    rec = {"engine": type(tr.model_wrapped).__name__, "backend": backend, "steps": tr.state.global_step,
           "log": tr.state.log_history, "peak": torch.cuda.max_memory_allocated() if cuda else None}
    if int(os.environ.get("RANK", 0)) == 0:
        Path(args.result).write_text(json.dumps(rec, default=str))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return 0


# ----------------------------------------------------------------------------------------------------- main
def probe_env(import_all: bool = True) -> Env:
    versions: dict[str, str | None] = {}
    errors: dict[str, str] = {}
    for name in PACKAGES:
        if importlib.util.find_spec(name) is None:
            versions[name] = None
            continue
        if name in ("bitsandbytes", "deepspeed") or not import_all:  # slow / noisy imports: the variants import them
            versions[name] = installed_version(name) or "?"
            continue
        try:
            mod = importlib.import_module(name)
            versions[name] = getattr(mod, "__version__", None) or installed_version(name) or "?"
        except Exception as e:  # noqa: BLE001 - reported as the skip reason of what needs it
            versions[name] = None
            errors[name] = f"{type(e).__name__}: {e}"[:300]
    cuda = bf16 = False
    device = "cpu"
    if versions.get("torch"):
        import torch

        cuda = torch.cuda.is_available()
        if cuda:
            device = torch.cuda.get_device_name(0)
            bf16 = torch.cuda.is_bf16_supported()
    return Env(cuda, bf16, device, versions, errors)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="tiny model only, 2 steps per variant (unless --steps), CUDA-only variants skipped")
    p.add_argument("--ds-on-cpu", action="store_true", help="with --cpu-dry-run: DeepSpeed rows through gloo on CPU")
    p.add_argument("--only", type=lambda s: [x.strip() for x in s.split(",") if x.strip()], default=None,
                   help="comma-separated variant names or patterns (e.g. 'bf16-lora/*,timing/*')")
    p.add_argument("--steps", type=int, default=None, help="steps per run (default 10; 2 with --cpu-dry-run)")
    p.add_argument("--skip", type=int, default=2, help="warm-up steps left out of the timing medians")
    p.add_argument("--repeats", type=int, default=2, help="alternating repeats of the timing runs")
    p.add_argument("--batch", type=int, default=8, help="batch size of the timing runs")
    p.add_argument("--budget-s", type=float, default=450.0, help="global deadline for all variants (seconds)")
    p.add_argument("--out", default="results/gpu-check", help="output folder when $OUT is not set")
    p.add_argument("--list", action="store_true", help="print the variants and exit")
    p.add_argument("--wheel-specs", action="store_true", help="print scripts/gpu_wheels.txt as 'pin options' lines")
    p.add_argument("--plan-install", metavar="DIR", help="print the carried files in DIR to install here")
    p.add_argument("--write-metadata", metavar="SITE", help="write this checkout's entry points into SITE if needed")
    p.add_argument("--ds-child", type=int, choices=[2, 3], help=argparse.SUPPRESS)
    p.add_argument("--artifact", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.ds_on_cpu and not a.cpu_dry_run:
        p.error("--ds-on-cpu needs --cpu-dry-run")
    for k in ("steps", "repeats", "batch"):
        if getattr(a, k) is not None and getattr(a, k) < (0 if k == "repeats" else 1):
            p.error(f"--{k} must be positive")
    if a.budget_s <= 0:
        p.error("--budget-s must be positive")
    if a.only:
        names = [v.name for v in all_variants()]
        unknown = [x for x in a.only if not any(fnmatch.fnmatchcase(n, x) for n in names)]
        if unknown:
            p.error(f"--only: no variant matches {', '.join(unknown)}; variants: {', '.join(names)}")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.wheel_specs:
        for s in read_wheel_list():
            print(" ".join([s.pin] + (["build"] if s.build else []) + (["optional"] if s.optional else [])))
        return 0
    if args.plan_install:
        files, notes = plan_install(read_wheel_list(), Path(args.plan_install))
        for n in notes:
            print("  " + n, file=sys.stderr)
        for f in files:
            print(f)
        return 0
    if args.write_metadata:
        print(ensure_metadata(Path(args.write_metadata)))
        return 0
    if args.list:
        for v in all_variants():
            print(f"{v.name:36s} needs {', '.join(v.needs)}")
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    if args.ds_child:
        return ds_child(args)
    env = probe_env()
    if args.cpu_dry_run and env.cuda:
        print("--cpu-dry-run on a machine with CUDA: the tiny-model runs use the GPU", flush=True)
    runner = Runner(args, env)
    print(runner.header(), flush=True)
    vs = all_variants()
    groups = {g: [v for v in vs if v.group == g] for g in ("bf16", "fp16", "qlora", "timing", "deepspeed")}

    def reserve_after(*later: str) -> float:  # time kept for later groups' selected, runnable variants
        return sum(runner.scale(v.est_s) for g in later for v in groups[g] if skip_reason(v, env, args) is None)

    runner.group_bf16(groups["bf16"])
    runner.group_fp16(groups["fp16"])
    runner.group_qlora(groups["qlora"])
    runner.group_timing(groups["timing"], reserve=reserve_after("deepspeed"))
    runner.group_deepspeed(groups["deepspeed"])
    runner.write()
    print("\n" + runner.header() + "\n\n" + format_table(runner.results), flush=True)
    print(f"\nwritten: {runner.out / 'gpu_check.md'}, {runner.out / 'gpu_check.json'}", flush=True)
    failed = [r.variant for r in runner.results if r.status in ("failed", "partial")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
