import json
import subprocess
import sys
import zipfile
from pathlib import Path

from safeguard_plugin.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_calibrate_inspect_eval_cli(tmp_path, capsys):
    out = tmp_path / "art"
    assert main(["calibrate", "--model", "tiny", "--out", str(out), "--limit", "40", "--batch-size", "8"]) == 0
    assert (out / "manifest.json").is_file() and (out / "refusal_direction.safetensors").is_file()
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["components"]["refusal_direction"]["selected_layers"]
    assert main(["eval", "--model", "tiny", "--prompts", "harmful", "borderline", "--limit", "3",
                 "--max-new-tokens", "3", "--out", str(tmp_path / "ev")]) == 0
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert set(report) == {"harmful", "borderline"} and report["harmful"]["n"] == 3
    assert (tmp_path / "ev" / "eval.md").read_text().startswith("# safeguard eval")


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    assert "manifest.json is missing" in capsys.readouterr().err
    assert main(["calibrate", "--model", "tiny", "--out", str(tmp_path / "a"), "--constraints", "nope"]) == 2
    assert "unknown constraint 'nope'" in capsys.readouterr().err


def test_wheel_contains_integrations_and_entry_points(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, cwd=tmp_path)
    (whl,) = tmp_path.glob("safeguard_plugin-*.whl")
    with zipfile.ZipFile(whl) as z:
        names = z.namelist()
        z.extractall(tmp_path / "site")
    assert "safeguard_plugin/integrations/trl.py" in names
    assert "safeguard_plugin/data/harmful.jsonl" in names
    assert "safeguard_plugin/bench/runner.py" in names and "safeguard_plugin/integrations/axolotl/plugin.py" in names
    meta = (tmp_path / "site" / next(n for n in names if n.endswith(".dist-info/METADATA"))).read_text()
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    core = [r for r in requires if "extra ==" not in r]
    assert not [r for r in core if r.split(">")[0].split("=")[0].split("<")[0].strip() in ("matplotlib", "gguf", "psutil")]
    assert {r.split(">")[0] for r in requires if 'extra == "bench"' in r} == {"matplotlib", "gguf", "psutil"}
    ep = next(n for n in names if n.endswith("entry_points.txt"))
    assert "procon = safeguard_plugin.constraints.procon:ProCon" in (tmp_path / "site" / ep).read_text()
    # import from the unpacked wheel (not the checkout): the integration module and the registry resolve there
    code = ("import safeguard_plugin, safeguard_plugin.integrations.trl as t; "
            "from safeguard_plugin import get_constraint; "
            "print(safeguard_plugin.__file__); print(t.__file__); print(get_constraint('procon').__module__)")
    res = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(tmp_path / 'site')!r}); {code}"],
                         capture_output=True, text=True, cwd=tmp_path, check=True)
    lines = res.stdout.strip().splitlines()
    assert all(line.startswith(str(tmp_path / "site")) for line in lines[:2]), lines
    assert lines[2] == "safeguard_plugin.constraints.procon.constraint"
    # every constraint the wheel declares (the registry of a fresh install, so a new one is covered unedited) imports
    # from the wheel, is a Constraint and validates its default config
    from importlib.metadata import EntryPoint

    declared = [EntryPoint(*line.split(" = ", 1), "safeguard_plugin.constraints")
                for line in (tmp_path / "site" / ep).read_text().split("[safeguard_plugin.constraints]")[1]
                .split("[")[0].strip().splitlines()]
    assert {e.name for e in declared} >= {"procon", "cwac", "guardspace", "adaptive_kl", "monitor"}
    check = ("import sys, importlib; from safeguard_plugin.constraints.base import Constraint; "
             "[print(n, importlib.import_module(m).__file__, issubclass(getattr(importlib.import_module(m), c), Constraint),"
             " getattr(importlib.import_module(m), c).config_class().enabled) for n, m, c in "
             f"{[(e.name, e.module, e.attr) for e in declared]!r}]")
    res = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(tmp_path / 'site')!r}); {check}"],
                         capture_output=True, text=True, cwd=tmp_path, check=True)
    rows = [line.split() for line in res.stdout.strip().splitlines()]
    assert len(rows) == len(declared) and all(r[1].startswith(str(tmp_path / "site")) and r[2:] == ["True", "True"]
                                              for r in rows), rows


def test_demo_tiny_is_honest(tmp_path):
    from safeguard_plugin.bench.demo import run_demo

    summary = run_demo("tiny", tmp_path, progress=False)
    assert set(summary["results"]) == {"aligned (before)", "plain SFT", "SFT + ProCon"}
    assert (tmp_path / "demo.md").read_text().count("|") > 10
    # a random 4-layer model has no refusal behaviour to lose: the demo must say so, not claim a win
    assert summary["verdict"].startswith("No effect to show")
