"""safeguard bench end to end on a tiny model (offline: the package-data fetchers are replaced by fakes)."""

import json

import pytest

from safeguard_plugin.bench import runner as bench


def test_methods_come_from_the_registry():
    methods = bench.benchmark_methods()
    assert list(methods)[:2] == ["base", "sft"]
    assert methods["procon"] == {"procon": {"weight": 100.0, "warmup_ratio": 0.1, "warmup_factor": 10.0}}
    assert "monitor" not in methods


def test_all_combined_row_is_adjusted_by_the_constraints():
    """CWAC's factor projection refuses adapters that start non-zero; GuardSpace declares that it builds such
    adapters, so in "all" CWAC keeps its SAE term and drops the projection. Alone, CWAC keeps both."""
    methods = bench.benchmark_methods()
    assert set(methods["all"]) >= {"procon", "cwac", "guardspace", "adaptive_kl"}
    assert methods["all"]["cwac"]["projection"] is False and methods["cwac"] == {"cwac": {}}
    assert methods["all"]["procon"] == methods["procon"]["procon"]
    from safeguard_plugin.constraints.cwac import CWAC
    from safeguard_plugin.constraints.procon import ProCon
    assert bench.method_bench(CWAC).combined({}, {"procon": bench.method_bench(ProCon)}) == {}


def test_bench_rows_live_next_to_each_constraint():
    """Rows come from the ``bench`` module in the constraint's package, found through the registry; a constraint
    without one gets one row with its default config."""
    from safeguard_plugin.constraints.base import Constraint
    from safeguard_plugin.constraints.guardspace import GuardSpace

    assert bench.bench_module_name(GuardSpace) == "safeguard_plugin.constraints.guardspace.bench"
    assert bench.method_bench(GuardSpace).nonzero_adapter_init
    assert not hasattr(Constraint, "benchmark_configs") and not hasattr(Constraint, "nonzero_adapter_init")

    class NoBench(Constraint):
        name = "no_bench_example"

    mb = bench.method_bench(NoBench)
    assert mb.rows == {"no_bench_example": {}} and mb.combined_config({}) == {} and not mb.nonzero_adapter_init


def test_smoke_bench_report_plots_and_resume(offline_benchdata, tmp_path, capsys, single_thread):
    b = bench.Bench("tiny", "smoke", tmp_path, methods=["base", "sft", "procon"], progress=False)
    res = b.run()
    assert [(r["method"], r["ratio"]) for r in res["runs"]] == [("base", 0.0), ("sft", 0.1), ("procon", 0.1)]
    assert [r["attack"] for r in res["runs"]] == [None, "template", "template"]  # the smoke profile's one attack
    for r in res["runs"]:
        assert set(r["metrics"]) >= {"harmful_refusal", "borderline_refusal", "harmless_refusal", "task_accuracy"}
    procon = res["runs"][2]
    assert procon["time_ratio"] > 0 and "memory_ratio" in procon
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["judge"]["accuracy"] == 0.9
    report = (tmp_path / "report.md").read_text()
    assert "| procon | 0.1 |" in report and "smoke" in report
    for png in ("refusal_vs_accuracy.png", "refusal_vs_ratio.png", "penalty_drift.png", "safety_during_training.png"):
        assert (tmp_path / png).stat().st_size > 1000
    # the live monitor measured plain SFT and ProCon alike (every step in the smoke profile), and only measured
    for name in ("sft", "procon"):
        run = json.loads((tmp_path / "runs" / f"template_p0.1__{name}.json").read_text())
        checks = [h for h in run["log_history"] if "safeguard/monitor_score_drop" in h]
        assert [h["step"] for h in checks] == [1, 2, 3], name
        assert run["config"] == (None if name == "sft" else {"procon": bench.benchmark_methods()["procon"]["procon"]})
    assert "safety_during_training.png" in report and "changes no weight" in report
    # a second run resumes: nothing is retrained
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("*")}
    b2 = bench.Bench("tiny", "smoke", tmp_path, methods=["base", "sft", "procon"], progress=True)
    b2.run()
    assert "done earlier" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("*")} == before
    # both rows come from the same earlier invocation, so their step-time ratio still stands
    assert [r.get("time_ratio") for r in b2.run()["runs"]][1:] == [1.0, pytest.approx(procon["time_ratio"])]


def test_step_time_ratio_only_between_runs_of_one_invocation():
    """A row reused from another invocation of the bench ran on a machine whose speed since is unknown: no ratio."""
    def row(method, t, inv):
        return {"method": method, "attack": "template", "ratio": 0.1, "step_median_s": t, "train_memory_bytes": 1,
                **({"invocation": inv} if inv else {})}

    runs = [row("sft", 10.0, "a"), row("procon", 12.0, "a"), row("anchor", 30.0, "b"), row("cwac", 11.0, None)]
    bench._add_ratios(runs)
    assert [r.get("time_ratio") for r in runs] == [1.0, pytest.approx(1.2), None, None]


def test_unknown_method_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown method"):
        bench.Bench("tiny", "smoke", tmp_path, methods=["sft", "magic"])
