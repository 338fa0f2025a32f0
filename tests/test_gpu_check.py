"""The CPU-runnable parts of the prepared GPU check (scripts/gpu_check.py, gpu_check.sh, gpu_wheels.sh): argument
parsing, the wheel list and install plan, the entry-point metadata, skip logic, the table, and one CPU dry run."""

import argparse
import importlib.metadata
import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPTS / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod
    spec.loader.exec_module(mod)
    return mod


def _env(gc, cuda=False, **missing):
    pk = {p: "1.0" for p in gc.PACKAGES}
    pk.update({k: None for k in missing})
    return gc.Env(cuda=cuda, bf16=cuda, device="test", packages=pk,
                  errors={k: v for k, v in missing.items() if isinstance(v, str)})


# ---------------------------------------------------------------------------------------------------- arguments
def test_parse_args_defaults_and_errors(gc, capsys):
    a = gc.parse_args([])
    assert not a.cpu_dry_run and a.only is None and a.steps is None and a.budget_s > 0
    a = gc.parse_args(["--cpu-dry-run", "--only", "qlora/*, timing/procon", "--steps", "3"])
    assert a.cpu_dry_run and a.only == ["qlora/*", "timing/procon"] and a.steps == 3
    for bad in (["--only", "nothing/like-this"], ["--ds-on-cpu"], ["--steps", "0"], ["--budget-s", "-1"]):
        with pytest.raises(SystemExit):
            gc.parse_args(bad)
    assert "no variant matches nothing/like-this" in capsys.readouterr().err


def test_list_names_every_constraint_in_bf16_and_the_issue_variants(gc):
    names = [v.name for v in gc.all_variants()]
    assert len(names) == len(set(names))
    assert {f"bf16-lora/{c}" for c in gc.CONSTRAINTS} <= set(names)
    # the registry's constraints are exactly those the bf16 rows cover
    from safeguard_plugin.registry import available_constraints

    assert set(available_constraints()) >= set(gc.CONSTRAINTS)
    assert {f"timing/{c}" for c in ("procon", "cwac", "adaptive_kl", "guardspace")} <= set(names)
    assert {"qlora/procon", "qlora/adaptive_kl", "qlora/guardspace-offset", "fp16/procon",
            "deepspeed/zero2", "deepspeed/zero3"} <= set(names)


# --------------------------------------------------------------------------------------------------- wheel list
def _lower_bounds() -> dict[str, str]:
    text = (ROOT / "pyproject.toml").read_text()
    deps = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
    return {re.sub(r"[-_.]+", "_", m.group(1)).lower(): m.group(2)
            for m in re.finditer(r'"([A-Za-z0-9_.-]+)>=([0-9.]+)"', deps)}


def test_wheel_list_covers_what_the_gpu_image_lacks_and_meets_pyproject(gc):
    specs = {s.key: s for s in gc.read_wheel_list()}
    # the plugin's and the check's needs that the GPU image does not ship (docs of the device tool)
    assert {"trl", "datasets", "pydantic", "pydantic_core", "deepspeed", "bitsandbytes"} <= set(specs)
    assert specs["deepspeed"].build and specs["bitsandbytes"].optional
    for name, low in _lower_bounds().items():
        if name in specs:
            assert gc.version_tuple(specs[name].version) >= gc.version_tuple(low), (name, specs[name].version, low)
    # their own needs the image lacks travel too (TRL -> datasets -> dill/multiprocess; pydantic's parts)
    for dist, needs in (("datasets", ("dill", "multiprocess")), ("pydantic", ("pydantic_core", "annotated_types",
                                                                             "typing_inspection"))):
        assert dist in specs and all(n in specs for n in needs)


def test_wheel_list_rejects_bad_lines(gc, tmp_path):
    f = tmp_path / "list.txt"
    f.write_text("trl>=1.0\n")
    with pytest.raises(ValueError, match="expected 'name==version"):
        gc.read_wheel_list(f)
    f.write_text("trl==1.0 fast\n")
    with pytest.raises(ValueError, match="unknown option"):
        gc.read_wheel_list(f)
    f.write_text("Typing_Extensions==4.0\ntyping-extensions==4.1\n")
    with pytest.raises(ValueError, match="listed twice: typing_extensions"):
        gc.read_wheel_list(f)


def test_gpu_wheels_sh_fetches_exactly_the_list(gc):
    out = subprocess.run(["bash", str(SCRIPTS / "gpu_wheels.sh"), "--print"], capture_output=True, text=True,
                         cwd=ROOT, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable}, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = dict(ln.split(": ", 1) for ln in out.stdout.splitlines())
    specs = gc.read_wheel_list()
    assert set(lines) == {s.pin for s in specs}
    for s in specs:
        cmd = lines[s.pin]
        assert cmd.endswith(s.pin)
        if s.build:
            assert "DS_BUILD_OPS=0" in cmd and " wheel " in cmd and "--no-build-isolation" in cmd
        else:
            assert "--only-binary=:all:" in cmd and "--no-deps" in cmd and "--python-version" in cmd
    out = subprocess.run(["bash", str(SCRIPTS / "gpu_wheels.sh"), "--print", "--no-bitsandbytes"], capture_output=True,
                         text=True, cwd=ROOT, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable}, timeout=60)
    assert "bitsandbytes" in out.stdout.splitlines()[0] + out.stdout and not any(
        ln.startswith("bitsandbytes==") for ln in out.stdout.splitlines())
    for script in ("gpu_wheels.sh", "gpu_check.sh"):
        assert subprocess.run(["bash", "-n", str(SCRIPTS / script)]).returncode == 0


def test_plan_install_takes_only_what_is_missing_or_too_old(gc, tmp_path):
    specs = [gc.WheelSpec("trl", "1.16.0"), gc.WheelSpec("typing-extensions", "4.16.0", min_version="4.16.0"),
             gc.WheelSpec("deepspeed", "0.19.8", build=True), gc.WheelSpec("bitsandbytes", "0.50.2", optional=True),
             gc.WheelSpec("pydantic-core", "2.50.5")]
    for name in ("trl-1.16.0-py3-none-any.whl", "typing_extensions-4.16.0-py3-none-any.whl",
                 "deepspeed-0.19.8.tar.gz", "trl-1.15.0-py3-none-any.whl",
                 "pydantic_core-2.50.5-cp312-cp312-manylinux_2_17_x86_64.whl"):
        (tmp_path / name).write_bytes(b"")
    have = {"trl": None, "typing-extensions": "4.12.2", "deepspeed": None, "bitsandbytes": None,
            "pydantic-core": "2.50.5"}
    files, notes = gc.plan_install(specs, tmp_path, installed=have.get)
    assert [f.name for f in files] == ["trl-1.16.0-py3-none-any.whl", "typing_extensions-4.16.0-py3-none-any.whl",
                                       "deepspeed-0.19.8.tar.gz"]
    assert any("4.12.2 is older than 4.16.0" in n for n in notes)
    assert any(n.startswith("bitsandbytes: not installed") and "optional" in n for n in notes)
    assert any(n.startswith("pydantic-core: 2.50.5 is installed") for n in notes)
    # a newer installed version is kept
    files, _ = gc.plan_install(specs[1:2], tmp_path, installed={"typing-extensions": "4.17.1"}.get)
    assert files == []


def test_metadata_gives_the_checkout_its_entry_points(gc, tmp_path):
    groups = gc.entry_point_groups()
    assert set(gc.CONSTRAINTS) <= set(groups["safeguard_plugin.constraints"])
    assert all(g.startswith("safeguard_plugin.") for g in groups)
    gc.write_metadata(tmp_path)
    dists = list(importlib.metadata.distributions(path=[str(tmp_path)]))
    assert len(dists) == 1 and dists[0].metadata["Name"] == "safeguard-plugin"
    eps = {(e.group, e.name): e.value for e in dists[0].entry_points}
    assert eps == {(g, k): v for g, names in groups.items() for k, v in names.items()}
    # the installed package already has them: nothing written
    assert "found" in gc.ensure_metadata(tmp_path / "unused") and not (tmp_path / "unused").exists()


# --------------------------------------------------------------------------------------------------- skip logic
def test_without_cuda_gpu_only_variants_skip_with_the_reason(gc):
    args = gc.parse_args(["--cpu-dry-run"])
    env = _env(gc)
    why = {v.name: gc.skip_reason(v, env, args) for v in gc.all_variants()}
    runs = {n for n, w in why.items() if w is None}
    assert runs == {v.name for v in gc.all_variants() if v.group in ("bf16", "timing")}
    assert "fp16 mixed precision" in why["fp16/procon"]
    assert all("bitsandbytes 4-bit" in w for n, w in why.items() if n.startswith("qlora/"))
    assert all("NCCL" in w for n, w in why.items() if n.startswith("deepspeed/"))
    # without --cpu-dry-run the 0.5B-shaped timing model needs the GPU
    full = {v.name: gc.skip_reason(v, env, gc.parse_args([])) for v in gc.all_variants()}
    assert all("0.5B" in w for n, w in full.items() if n.startswith("timing/"))
    assert full["bf16-lora/procon"] is None
    # --ds-on-cpu: the DeepSpeed rows run through gloo
    ds = gc.parse_args(["--cpu-dry-run", "--ds-on-cpu"])
    assert gc.skip_reason(next(v for v in gc.all_variants() if v.name == "deepspeed/zero3"), env, ds) is None


def test_missing_packages_and_selection_skip_with_the_reason(gc):
    args = gc.parse_args([])
    env = _env(gc, cuda=True, bitsandbytes=None, deepspeed="ImportError: no module named 'hjson'")
    why = {v.name: gc.skip_reason(v, env, args) for v in gc.all_variants()}
    assert all(w == "bitsandbytes not installed" for n, w in why.items() if n.startswith("qlora/"))
    assert why["deepspeed/zero2"] == "deepspeed not importable: ImportError: no module named 'hjson'"
    assert why["fp16/procon"] is None and why["timing/guardspace"] is None
    env = _env(gc, cuda=True, trl="ImportError: datasets needs pyarrow>=24")
    assert all("trl not importable: ImportError: datasets needs pyarrow" in gc.skip_reason(v, env, args)
               for v in gc.all_variants())
    only = gc.parse_args(["--only", "qlora/*"])
    sel = [v.name for v in gc.all_variants() if gc.skip_reason(v, _env(gc, cuda=True), only) is None]
    assert sel and all(n.startswith("qlora/") for n in sel)
    assert gc.skip_reason(gc.all_variants()[0], _env(gc, cuda=True), only) == "not selected (--only)"


def test_a_variant_over_the_remaining_budget_is_skipped_not_started(gc, tmp_path, monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    args = gc.parse_args(["--budget-s", "5", "--out", str(tmp_path)])
    runner = gc.Runner(args, _env(gc, cuda=True))
    v = next(v for v in gc.all_variants() if v.name == "timing/procon")
    assert v.est_s > 5
    r = runner.run(v, lambda *_: pytest.fail("a variant over the budget must not start"))
    assert r.status == "skipped" and r.notes.startswith("budget:")
    # a variant that raises is reported as failed and the run goes on
    small = gc.Variant("x/raises", "bf16", None, (), 0.0)
    r = runner.run(small, lambda *_: 1 / 0)
    assert r.status == "failed" and "ZeroDivisionError" in r.notes
    rec = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [x["variant"] for x in rec["results"]] == ["timing/procon", "x/raises"]


# --------------------------------------------------------------------------------------------------- the table
def test_table_formats_ratios_states_and_escapes_cells(gc):
    t_plain, t_var, m_plain, m_var = 0.25, 0.31, 3.0e9, 3.3e9
    rs = [gc.Result("timing/plain", "ran", "–", 1.0, 1.0, "baseline"),
          gc.Result("timing/procon", "ran", "yes", t_var / t_plain, m_var / m_plain, "a | b\nc"),
          gc.Result("qlora/procon", "skipped", notes="needs CUDA"),
          gc.Result("fp16/procon", "failed", notes="x" * 500)]
    lines = gc.format_table(rs).splitlines()
    assert lines[0].split("|")[1:-1] == [" variant ", " result ", " penalty active ", " step-time ratio ",
                                         " peak CUDA memory ratio ", " notes "]
    assert len(lines) == 2 + len(rs)
    cells = [re.split(r"(?<!\\)\|", ln)[1:-1] for ln in lines]
    assert all(len(c) == 6 for c in cells)
    assert cells[3][3].strip() == f"{t_var / t_plain:.2f}" and cells[3][4].strip() == f"{m_var / m_plain:.2f}"
    assert cells[3][5].strip() == "a \\| b c"
    assert cells[4][1].strip() == "skipped" and cells[4][3].strip() == "–" and cells[4][5].strip() == "needs CUDA"
    assert len(cells[5][5].strip()) < 300 and cells[5][5].strip().endswith("…")
    assert gc.fmt_ratio(math.nan) == "–"


def test_penalty_summary(gc):
    log = [{"loss": 1.0, "safeguard/penalty": 0.0}, {"loss": 1.0, "safeguard/penalty": 0.02}]
    assert gc.penalty_summary(log, "procon")[0] == "yes"
    assert gc.penalty_summary(log[:1], "procon")[0] == "no (always 0)"
    assert gc.penalty_summary([{"safeguard/penalty": float("nan")}, *log], "cwac")[0] == "no (non-finite)"
    assert gc.penalty_summary([{"loss": 1.0}], "adaptive_kl")[0] == "no (not logged)"
    assert gc.penalty_summary([{"safeguard/guardspace_update_norm": 0.5}], "guardspace")[0].startswith("n/a")
    assert gc.penalty_summary(log, None)[0] == "–"


# --------------------------------------------------------------------------------------------------- dry run
def test_cpu_dry_run_end_to_end(gc, tmp_path, monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    only = "bf16-lora/plain,bf16-lora/procon,timing/procon"
    rc = gc.main(["--cpu-dry-run", "--only", only, "--repeats", "1", "--out", str(tmp_path)])
    rec = json.loads((tmp_path / "gpu_check.json").read_text())
    res = {r["variant"]: r for r in rec["results"]}
    assert rc == 0, {k: r["notes"] for k, r in res.items() if r["status"] != "skipped"}
    assert {v.name for v in gc.all_variants()} == set(res)
    ran = {k for k, r in res.items() if r["status"] == "ran"}
    assert ran == {"bf16-lora/plain", "bf16-lora/procon", "timing/plain", "timing/procon"}
    assert all(r["notes"] for r in res.values() if r["status"] == "skipped")
    # ProCon's penalty reached the loss and changed training (same seed and data as plain)
    assert res["bf16-lora/procon"]["penalty"] == "yes"
    assert float(re.search(r"Δw\| vs plain ([0-9.e+-]+)", res["bf16-lora/procon"]["notes"]).group(1)) > 0
    assert all(len(r["data"]["log"]) >= rec["steps"] for k, r in res.items() if k in ran)
    # timing: the plain baseline ran although --only did not name it; the ratio is the step-time medians' ratio
    assert res["timing/plain"]["time_ratio"] == 1.0 and res["timing/procon"]["penalty"] == "yes"
    import statistics

    med = {k: statistics.median(res[k]["data"]["step_times"][0]) for k in ("timing/plain", "timing/procon")}
    assert res["timing/procon"]["time_ratio"] == pytest.approx(med["timing/procon"] / med["timing/plain"])
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| timing/procon | ran | yes |" in md and "CPU dry run" in md


def test_dry_run_table_names_every_variant(gc, tmp_path):
    """--list prints the variant names the table uses (a quick look before spending device time)."""
    out = subprocess.run([sys.executable, str(SCRIPTS / "gpu_check.py"), "--list"], capture_output=True, text=True,
                         timeout=60)
    assert [ln.split()[0] for ln in out.stdout.splitlines()] == [v.name for v in gc.all_variants()]
    assert isinstance(gc.parse_args(["--list"]), argparse.Namespace)
