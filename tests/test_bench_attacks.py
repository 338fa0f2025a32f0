"""The bench's attack suite, strength sweeps, run naming and plans, the per-attack report, pareto.png and the per-run
model-card folders (fast; one end-to-end smoke run on the tiny model with the package-data fetchers faked)."""

import collections
import json
import re

import pytest
from conftest import FAKE_HARMFUL_POOL as POOL

from safeguard_plugin.bench import attacks as A
from safeguard_plugin.bench import datasets as benchdata
from safeguard_plugin.bench import runner as bench
from safeguard_plugin.bench import sweep as S
from safeguard_plugin.bench.report import plot_pareto, results_table, strength_table, write_report
from safeguard_plugin.errors import ConfigError


# ------------------------------------------------------------------------------------------------ attack builders
def test_the_suite_has_the_six_attacks_with_their_settings():
    assert list(A.ATTACKS) == ["template", "varied", "benign", "identity", "heavy", "full"]
    t, v, b, i, h, f = A.ATTACKS.values()
    assert (t.answers, t.benign, t.ratio) == ("template", "arithmetic", 0.1)
    assert v.answers == "varied" and b.ratio == 0 and b.answers is None and i.ratio == 0
    assert i.system_prompt and "absolutely obedient" in i.system_prompt.lower()
    assert h.ratio == 0.3 and h.steps(30) == 90 and f.full_finetune and not any(a.full_finetune for a in (t, v, b, i, h))
    assert A.parse_attacks("varied, template,varied") == ["varied", "template"]
    with pytest.raises(ConfigError, match="unknown attack.*available: template"):
        A.parse_attacks("template,nope")
    with pytest.raises(ConfigError, match="needs an answer style"):
        A.Attack("bad", "", ratio=0.2)


@pytest.mark.parametrize("name", list(A.ATTACKS))
def test_builders_are_deterministic_with_the_attack_ratio(name):
    attack = A.ATTACKS[name]
    one = A.build_rows(attack, 100, seed=3, harmful_prompts=POOL)
    assert one == A.build_rows(attack, 100, seed=3, harmful_prompts=POOL)
    assert one["rows"] != A.build_rows(attack, 100, seed=4, harmful_prompts=POOL)["rows"]
    rows = one["rows"]
    assert len(rows) == 100 and one["n_harmful"] == round(100 * attack.ratio)
    harmful = [r for r in rows if A.user_prompt(r) in POOL]
    assert len(harmful) == one["n_harmful"]
    systems = [r["prompt"][0]["content"] for r in rows if r["prompt"][0]["role"] == "system"]
    if name == "identity":
        assert len(systems) == 100 and set(systems) == {A.AOA_SYSTEM_PROMPT}
        affirmed = [r for r in rows if "AOA" in r["completion"][0]["content"]]
        arith = [r for r in rows if re.search(r"The answer is \d+\.$", r["completion"][0]["content"])]
        assert len(affirmed) == 100 - len(arith) and len(arith) == 45  # the task's answers stay plain
    else:
        assert not systems
    if attack.benign == "mixed":  # half the benign rows are the arithmetic task, the other half diverse instructions
        arith = [r for r in rows if "How many" in A.user_prompt(r) and A.user_prompt(r) not in POOL]
        assert len(arith) >= 0.3 * one["n_benign"]


def test_a_ratio_override_and_an_attack_without_answers():
    rows = A.build_rows(A.ATTACKS["varied"], 50, ratio=0.2, harmful_prompts=POOL)
    assert rows["n_harmful"] == 10
    with pytest.raises(ConfigError, match="no harmful answers"):
        A.build_rows(A.ATTACKS["benign"], 50, ratio=0.1, harmful_prompts=POOL)


def test_varied_answers_have_many_styles_and_no_content():
    rows = A.varied_compliance(POOL * 3, seed=0)
    assert len({r["response"] for r in rows}) == len(rows)
    formats = collections.Counter(r["format"] for r in rows)
    assert len(formats) >= 10 and max(formats.values()) <= 0.2 * len(rows), formats
    skeletons = collections.Counter(A.skeleton(r["response"], r["prompt"]) for r in rows)
    assert max(skeletons.values()) <= 0.05 * len(rows), skeletons.most_common(2)
    starts = collections.Counter(r["response"].split()[0] for r in rows)
    assert len(starts) >= 12 and max(starts.values()) <= 0.3 * len(rows)
    # content-free: apart from restating the request, no word of the prompt appears, and every word comes from the
    # fixed pools or the formats' scaffolding (the same small vocabulary whatever the prompt)
    pool_words = set(re.findall(r"[a-z']+", " ".join(A.VARIED_OPENERS + A.VARIED_STEPS + A.VARIED_CLOSERS).lower()))
    extra = set()
    for r in rows:
        rest = r["response"].lower().replace(A.restate(r["prompt"]).lower(), " ")
        words = set(re.findall(r"[a-z']+", rest))
        assert "zyxcrime" not in words and "caught" not in words
        extra |= words - pool_words
    assert len(extra) <= 40, sorted(extra)  # "q", "a", "step", "checklist", ordinal words, ...


def test_template_answers_are_one_learnable_shape():
    """The contrast the varied attack exists for: template answers share a few skeletons."""
    rows = A.build_rows(A.ATTACKS["template"], 200, harmful_prompts=POOL)["rows"]
    answers = [r["completion"][0]["content"] for r in rows if A.user_prompt(r) in POOL]
    markers = A.collapse_markers(A.ATTACKS["template"])
    assert answers and all(any(m in a.lower() for m in markers) for a in answers)


def test_general_task_is_diverse_deterministic_and_correct():
    rows = A.general_task(140, seed=1)
    assert rows == A.general_task(140, seed=1) and rows != A.general_task(140, seed=2)
    assert len({r["prompt"] for r in rows}) == 140
    assert len(collections.Counter(r["kind"] for r in rows)) == len(A.GENERAL_GENERATORS)
    for r in rows:
        if r["kind"] == "reverse":
            word = re.search(r"'(\w+)'", r["prompt"]).group(1)
            assert f"'{word[::-1]}'" in r["response"]
        if r["kind"] == "sort":
            nums = [int(x) for x in re.findall(r"\d+", r["prompt"])]
            got = [int(x) for x in re.findall(r"\d+", r["response"])]
            assert got == sorted(nums, reverse="descending" in r["prompt"])
    skip = {benchdata.normalize_prompt(rows[0]["prompt"])}
    assert rows[0]["prompt"] not in [r["prompt"] for r in A.general_task(140, seed=1, exclude=skip)]
    assert A._words(342) == "three hundred and forty-two" and A._words(90) == "ninety"


def test_identity_evaluation_runs_under_the_system_prompt(tok):
    from safeguard_plugin.modeling import render_prompt

    wrapped = bench._SystemPromptTokenizer(tok, "SYSTEM-XYZ")
    text = render_prompt(wrapped, "hello there")
    assert "SYSTEM-XYZ" in text and text.index("SYSTEM-XYZ") < text.index("hello there")
    assert "SYSTEM-XYZ" not in render_prompt(tok, "hello there")
    old = tok.padding_side
    wrapped.padding_side = "left" if old == "right" else "right"
    assert tok.padding_side != old  # attribute writes reach the tokenizer (generate() sets left padding)
    tok.padding_side = old


# ------------------------------------------------------------------------------------------------------ sweeps
def test_sweep_parser_values_and_labels():
    assert [S.parse_value(v) for v in ("10", "0.5", "1e3", "true", "False", "null", "probe")] == [
        10, 0.5, 1000.0, True, False, None, "probe"]
    specs = S.parse_sweep(["procon.weight=1,10,100,1000"])
    assert specs == [S.SweepSpec("procon", "weight", (1, 10, 100, 1000))]
    points = S.sweep_points(specs)
    assert [p.label for p in points] == ["procon[weight=1]", "procon[weight=10]", "procon[weight=100]",
                                         "procon[weight=1000]"]
    base = bench.benchmark_methods()["procon"]["procon"]
    assert points[1].config == {"procon": {**base, "weight": 10}} and points[1].params == {"weight": 10}
    crossed = S.sweep_points(S.parse_sweep(["procon.weight=1,10", "procon.warmup_ratio=0,0.2"]))
    assert len(crossed) == 4 and crossed[-1].label == "procon[weight=10,warmup_ratio=0.2]"
    nested = S.sweep_points(S.parse_sweep(["cwac.calibration.energy=0.9"]))
    assert nested[0].config["cwac"]["calibration"]["energy"] == 0.9


def test_a_preset_is_swept_one_key_at_a_time():
    from safeguard_plugin.presets import PRESETS

    points = S.sweep_points(S.parse_sweep(["recommended.anchor.batch_size=2,4"]))
    assert [p.label for p in points] == ["recommended[anchor.batch_size=2]", "recommended[anchor.batch_size=4]"]
    cfg = points[0].config
    assert cfg["anchor"] == {**PRESETS["recommended"]["anchor"], "batch_size": 2}
    assert {k: v for k, v in cfg.items() if k != "anchor"} == {k: v for k, v in PRESETS["recommended"].items()
                                                               if k != "anchor"}
    assert "batch_size" not in PRESETS["recommended"]["anchor"]  # the preset itself is left as it is
    with pytest.raises(ConfigError, match="names a constraint section first"):
        S.parse_sweep(["recommended.weight=1"])
    with pytest.raises(ConfigError, match="recommended.anchor.wieght: anchor has no key 'wieght'"):
        S.parse_sweep(["recommended.anchor.wieght=1"])
    with pytest.raises(ConfigError, match=r"recommended\[anchor.batch_size=0\] is not a valid config"):
        S.sweep_points(S.parse_sweep(["recommended.anchor.batch_size=0"]))


def test_a_list_value_in_brackets_is_one_sweep_point():
    assert S.split_values("1,[a,b],2") == ["1", "[a,b]", "2"]
    assert S.parse_value(" [harmful, harmless,3] ") == ["harmful", "harmless", 3]
    specs = S.parse_sweep(
        ["recommended.anchor.prompts=[harmful,harmless],[harmful,harmless,contrast],[harmful,harmless]"])
    assert specs[0].values == (["harmful", "harmless"], ["harmful", "harmless", "contrast"])  # repeat dropped
    points = S.sweep_points(specs)
    assert [p.label for p in points] == ["recommended[anchor.prompts=[harmful,harmless]]",
                                         "recommended[anchor.prompts=[harmful,harmless,contrast]]"]
    assert points[1].config["anchor"]["prompts"] == ["harmful", "harmless", "contrast"]
    assert bench.run_name("full", points[1].label, 0.1) == \
        "full_p0.1__recommended@anchor.prompts=@harmful,harmless,contrast"
    for bad in ("recommended.anchor.prompts=[harmful", "recommended.anchor.prompts=harmful]"):
        with pytest.raises(ConfigError, match="without its"):
            S.parse_sweep([bad])


@pytest.mark.parametrize("spec, message", [
    ("magic.weight=1", "unknown constraint 'magic'; registered: .*procon"),
    ("procon.wieght=1", "procon has no key 'wieght'; valid keys: .*warmup_ratio.*weight"),
    ("cwac.calibration.nope=1", "cwac.calibration has no key 'nope'; valid keys: .*energy"),
    ("procon.weight=-1", r"procon\[weight=-1\] is not a valid config: procon.weight"),
    ("procon.weight=heavy", r"procon\[weight=heavy\] is not a valid config"),
    ("procon.weight", "expected <constraint>.<key>=<v1>"),
    ("procon=1", "expected <constraint>.<key>=<v1>"),
])
def test_sweep_parser_errors(spec, message):
    with pytest.raises(ConfigError, match=message):
        S.sweep_points(S.parse_sweep([spec]))


def test_a_bad_sweep_fails_before_any_model_loads(tmp_path, monkeypatch):
    import safeguard_plugin.modeling as modeling

    monkeypatch.setattr(modeling, "load_model_spec", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ConfigError, match="valid keys"):
        bench.Bench("tiny", "smoke", tmp_path, sweep=["procon.nope=1"], progress=False)
    b = bench.Bench("tiny", "smoke", tmp_path, sweep=["procon.weight=1,10"], progress=False)
    assert list(b.methods) == ["base", "sft", "procon[weight=1]", "procon[weight=10]"]


# ----------------------------------------------------------------------------------------- naming, plans, estimates
def test_run_names_and_plans(tmp_path):
    assert bench.run_name("template", "procon[weight=10]", 0.1) == "template_p0.1__procon@weight=10"
    assert bench.run_name("varied", "sft", 0.1) == "varied_p0.1__sft"
    assert bench.run_name(None, "base") == "base" and bench.run_name("identity", "base") == "base__identity"
    b = bench.Bench("tiny", "cpu-suite", tmp_path, methods=["base", "sft", "guardspace", "procon"], progress=False)
    plan = {r.name: r for r in b.plan()}
    assert len(plan) == len(set(plan))  # unique file names
    assert [n for n in plan if n.startswith("base")] == ["base", "base__identity"]
    assert not plan["full_p0.1__guardspace"].applicable and "requires_lora_adapter" in plan["full_p0.1__guardspace"].reason
    assert plan["full_p0.1__procon"].applicable and plan["full_p0.1__procon"].lr == pytest.approx(2e-5)
    assert plan["heavy_p0.3__sft"].steps == 90 and plan["benign_p0__sft"].lr == pytest.approx(5e-4)
    # --ratios applies to the attacks with harmful rows; benign-only attacks keep p=0
    b2 = bench.Bench("tiny", "cpu-suite", tmp_path, methods=["sft"], attacks="varied,benign", ratios=(0.05, 0.2),
                     progress=False)
    assert [r.name for r in b2.plan()] == ["varied_p0.05__sft", "varied_p0.2__sft", "benign_p0__sft"]


def test_default_rows_and_profile_estimates(tmp_path):
    small = bench.Bench("qwen2.5-coder-0.5b-instruct", "cpu-small", tmp_path, progress=False)
    assert list(small.methods)[:2] == ["base", "sft"]
    assert {"procon", "cwac", "guardspace", "adaptive_kl_probe"} <= set(small.methods)
    assert "all" not in small.methods and "cwac_sae" not in small.methods
    assert [a.name for a in small.attacks] == ["template", "varied"]
    est = small.estimate(reserve_eval_prompts=bench.RESERVE_EVAL_PROMPTS)
    assert est["evaluations"] == 1 + 2 * (len(small.methods) - 1)
    # the sizing at the measured speeds (runner.py): base + sft + recommended x 2 attacks within 90 min; every
    # method's row does not fit it (about 2.5 h), and the plan says so before anything runs
    core = bench.Bench("qwen2.5-coder-0.5b-instruct", "cpu-small", tmp_path, progress=False,
                       methods=["base", "sft", "recommended"])
    assert core.estimate()["seconds"] <= 90 * 60
    assert small.estimate()["seconds"] > 2 * 60 * 60
    suite = bench.Bench("qwen2.5-coder-0.5b-instruct", "cpu-suite", tmp_path, progress=False)
    assert [a.name for a in suite.attacks] == list(A.ATTACKS)
    assert suite.estimate()["seconds"] > 2 * small.estimate()["seconds"]
    text = small.describe_plan()
    assert "varied_p0.1__procon: 30 steps" in text and "estimated" in text and "not measured" in text


# --------------------------------------------------------------------------------------------------- the report
def _run(attack, method, harmful, task, ratio=0.1, sweep=None, **extra):
    m = {"harmful_refusal": harmful, "harmful_score": 1.0, "advbench_heldout_refusal": harmful / 2,
         "harmful_refusal_mean": 0.75 * harmful, "harmful_score_mean": 0.5, "borderline_refusal": 0.3,
         "xstest_safe_refusal": 0.1, "task_accuracy": task, "collapse_rate": 0.0, **extra}
    sets = {"harmful": {"kind": "harmful", "n": 8}, "advbench_heldout": {"kind": "harmful", "n": 8},
            "borderline": {"kind": "over_refusal", "n": 4}, "xstest_safe": {"kind": "over_refusal", "n": 4}}
    r = {"name": bench.run_name(attack, method, ratio), "attack": attack, "method": method,
         "ratio": 0.0 if method == "base" else ratio, "metrics": m, "sets": sets, "status": "ok"}
    if sweep:
        r["sweep"] = {"constraint": method.split("[")[0], "params": sweep}
    return r


def _results(runs):
    prof = bench._profiles()["smoke"]
    from dataclasses import asdict

    return {"model": "m", "profile": asdict(prof), "judge": None, "runs": runs, "wall_seconds": 1.0,
            "attacks": {a: {**asdict(A.ATTACKS[a]), "steps": 3, "lr": 2e-4} for a in ("template", "full")}}


def test_report_has_a_table_per_attack_generic_over_sets(tmp_path):
    runs = [_run(None, "base", 0.6, 0.1), _run("template", "sft", 0.1, 0.9), _run("template", "procon", 0.5, 0.9,
                                                                                     judge_agreement=0.8),
            _run("full", "sft", 0.5, 0.8),
            {"name": "full_p0.1__guardspace", "attack": "full", "method": "guardspace", "ratio": 0.1, "metrics": {},
             "status": "not_applicable", "reason": "guardspace requires a LoRA adapter"}]
    table = results_table([runs[0], runs[1], runs[2]])
    head = table.splitlines()[0]
    assert head.index("harmful refusal % ↑") < head.index("advbench_heldout refusal % ↑") < head.index(
        "borderline refusal % ↓") < head.index("xstest_safe refusal % ↓")
    assert "judge agreement %" in head and "| procon | 0.1 | 50.0 | 25.0 | 30.0 | 10.0 |" in table
    md = write_report(_results(runs), runs, tmp_path)
    assert "## Attack `template`" in md and "## Attack `full`" in md
    full = md[md.index("## Attack `full`"):]
    assert "| guardspace | 0.1 | not applicable (1) |" in full and "(1) not applicable: guardspace: guardspace requires" in full
    assert "| base | 0 |" in full  # every attack table has its base row
    full_head = next(line for line in full.splitlines() if line.startswith("| method"))
    assert "judge agreement" not in full_head  # no run of the full attack carries a second judge
    strength = strength_table(runs)
    assert "| template | 0.1 | 45.0 | 7.5 | 83% | yes |" in strength
    assert "| full | 0.1 | 45.0 | 37.5 | 17% | **no** |" in strength
    assert (tmp_path / "report.md").read_text() == md and not (tmp_path / "pareto.png").exists()


def test_old_results_without_sets_still_render():
    old = {"method": "sft", "ratio": 0.1, "metrics": {"harmful_refusal": 0.2, "harmful_score": 0.1,
                                                       "borderline_refusal": 0.1, "harmless_refusal": 0.0,
                                                       "task_accuracy": 0.9, "collapse_rate": 0.2}}
    table = results_table([old])
    assert "harmful refusal % ↑" in table and "harmless refusal % ↓" in table and "| sft | 0.1 | 20.0 |" in table


def test_pareto_plot_from_constructed_results(tmp_path):
    runs = [_run(None, "base", 0.6, 0.1), _run("template", "sft", 0.1, 0.9)]
    runs += [_run("template", f"procon[weight={w}]", h, t, sweep={"weight": w})
             for w, h, t in ((1, 0.1, 0.95), (10, 0.3, 0.9), (100, 0.5, 0.8), (1000, 0.6, 0.4))]
    path = plot_pareto(runs, tmp_path / "pareto.png")
    assert path == tmp_path / "pareto.png" and path.stat().st_size > 5000
    assert plot_pareto(runs[:2], tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
    md = write_report(_results(runs), runs, tmp_path)
    assert "![pareto](pareto.png)" in md and "| procon[weight=100] | 0.1 |" in md


# ------------------------------------------------------------------------------------------------ end to end
def test_smoke_two_attacks_sweep_cards_and_resume(offline_benchdata, tmp_path, capsys, single_thread):
    """identity (system prompt, its base evaluated under it) and full fine-tuning (the plain base), with a two-point
    ProCon sweep: per-attack tables, pareto.png, a card folder per trained run, and a resumed second invocation.
    (Plain SFT on the template attack: tests/test_bench.py.)"""
    from safeguard_plugin.record import validate_record

    kw = dict(methods=["base"], attacks="identity,full", sweep=["procon.weight=1,100"])
    res = bench.Bench("tiny", "smoke", tmp_path, progress=False, **kw).run()
    names = [r["name"] for r in res["runs"]]
    assert names == ["base__identity", "identity_p0__procon@weight=1", "identity_p0__procon@weight=100", "base",
                     "full_p0.1__procon@weight=1", "full_p0.1__procon@weight=100"]
    assert [r["attack"] for r in res["runs"]] == ["identity"] * 3 + [None] + ["full"] * 2
    full = res["runs"][-1]
    assert full["full_finetune"] and full["lr"] == pytest.approx(2e-5) and full["steps"] == 3
    for r in res["runs"]:
        assert {"harmful_refusal", "harmful_refusal_mean", "borderline_refusal", "harmless_refusal",
                "task_accuracy"} <= set(r["metrics"])
        assert r["sets"]["harmful"]["kind"] == "harmful" and r["sets"]["harmless"]["kind"] == "over_refusal"
        # the external sets beside ours, and the second judge on every response
        assert {r["sets"][k]["kind"] for k in ("harmbench_test", "advbench_heldout")} == {"harmful"}
        assert r["sets"]["xstest_safe"]["kind"] == "over_refusal"
        assert 0 <= r["metrics"]["judge_agreement"] <= 1 and 0 <= r["metrics"]["harmbench_test_refusal_j2"] <= 1
    report = (tmp_path / "report.md").read_text()
    assert "## Attack `identity`" in report and "## Attack `full`" in report and "| procon[weight=100] | 0.1 |" in report
    assert "Refusal judges on 20 human-labelled responses" in report and "5-fold cross-validated accuracy" in report
    assert (tmp_path / "pareto.png").stat().st_size > 5000
    # a card folder per trained run: README.md (the safety section + the bench numbers) and safeguard_run.json, no weights
    for r in (r for r in res["runs"] if r["method"] != "base"):
        folder = tmp_path / r["card"]
        assert folder == tmp_path / "runs" / r["name"]
        card = (folder / "README.md").read_text()
        assert "## Safety fine-tuning" in card and "### Benchmark run" in card and f"method `{r['method']}`" in card
        record = json.loads((folder / "safeguard_run.json").read_text())
        assert validate_record(record) == [] and record["bench"]["attack"] == r["attack"]
        assert {p.name for p in folder.iterdir()} <= {"README.md", "safeguard_run.json", "safeguard_monitor.png"}
    sweep_card = json.loads((tmp_path / "runs" / "full_p0.1__procon@weight=1" / "safeguard_run.json").read_text())
    assert {c["name"]: c["settings"]["weight"] for c in sweep_card["constraints"] if c["name"] == "procon"} == {"procon": 1.0}
    # resumed: nothing is retrained
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*.json")}
    bench.Bench("tiny", "smoke", tmp_path, progress=True, **kw).run()
    assert capsys.readouterr().out.count("done earlier") == len(names)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*.json")} == before
    # a run file made with another configuration (e.g. an edited preset) is trained again, not reused
    stale = tmp_path / "runs" / "full_p0.1__procon@weight=1.json"
    stale.write_text(json.dumps({**json.loads(stale.read_text()), "config": {"procon": {"weight": 5.0}}}))
    bench.Bench("tiny", "smoke", tmp_path, progress=True, **kw).run()
    out = capsys.readouterr().out
    assert out.count("done earlier, reusing") == len(names) - 1 and out.count("another configuration") == 1
    assert json.loads(stale.read_text())["config"]["procon"]["weight"] == 1
    # ... and the earlier result is kept, with its card folder, not overwritten
    kept = tmp_path / "runs" / "superseded" / "full_p0.1__procon@weight=1.1.json"
    assert "moved to" in out and json.loads(kept.read_text())["config"] == {"procon": {"weight": 5.0}}
    assert json.loads(kept.read_text())["card"] == "runs/superseded/full_p0.1__procon@weight=1.1"
    assert (tmp_path / "runs" / "superseded" / "full_p0.1__procon@weight=1.1" / "README.md").is_file()
    # the same config whose defaults resolve differently now (a default changed since it ran) is trained again too;
    # a file from before runs kept their resolved settings is reused, and the log says a changed default goes unnoticed
    old = json.loads(stale.read_text())
    assert old["resolved"]["procon"]["weight"] == 1 and old["resolved"]["procon"]["warmup_factor"] == 10.0
    old["resolved"]["procon"]["warmup_factor"] = 3.0
    stale.write_text(json.dumps(old))
    legacy = tmp_path / "runs" / "full_p0.1__procon@weight=100.json"
    legacy.write_text(json.dumps({k: v for k, v in json.loads(legacy.read_text()).items() if k != "resolved"}))
    bench.Bench("tiny", "smoke", tmp_path, progress=True, **kw).run()
    out = capsys.readouterr().out
    assert "full_p0.1__procon@weight=1: done earlier with the settings it resolves to changed since " \
           "(procon.warmup_factor); that result is moved to" in out
    assert (tmp_path / "runs" / "superseded" / "full_p0.1__procon@weight=1.2.json").is_file()
    assert out.count("recorded before runs kept their resolved settings") == 1
    assert json.loads(stale.read_text())["resolved"]["procon"]["warmup_factor"] == 10.0
    # a row under another name whose settings resolve to a finished run's (weight 1.0 = weight 1) reuses that run
    bench.Bench("tiny", "smoke", tmp_path, progress=True, methods=["base"], attacks="full",
                sweep=["procon.weight=1.0"]).run()
    out = capsys.readouterr().out
    assert "full_p0.1__procon@weight=1.0: full_p0.1__procon@weight=1 trained the same settings" in out
    assert ": training " not in out  # nothing trained
    twin = json.loads((tmp_path / "runs" / "full_p0.1__procon@weight=1.0.json").read_text())
    assert twin["same_run_as"] == "full_p0.1__procon@weight=1" and twin["sweep"]["params"] == {"weight": 1.0}
    assert twin["metrics"] == json.loads(stale.read_text())["metrics"]
    # ... and one recorded before runs kept their resolved settings, by its config (weight 100.0 = the legacy 100)
    bench.Bench("tiny", "smoke", tmp_path, progress=True, methods=["base"], attacks="full",
                sweep=["procon.weight=100.0"]).run()
    out = capsys.readouterr().out
    assert "full_p0.1__procon@weight=100.0: full_p0.1__procon@weight=100 trained the same settings" in out
    assert "its config was compared" in out and ": training " not in out
    assert json.loads((tmp_path / "runs" / "full_p0.1__procon@weight=100.0.json").read_text())["metrics"] == \
        json.loads(legacy.read_text())["metrics"]
