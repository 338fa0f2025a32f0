"""Axolotl integration: real ``axolotl train`` runs on a tiny local model (CPU, a few steps).

Runs only where Axolotl is installed (``scripts/axolotl_env.sh`` -> ``.venv-axolotl``)::

    .venv-axolotl/bin/python -m pytest tests/test_axolotl.py -q -p no:cacheprovider

Each Axolotl process costs ~15-25 s of start-up, so the runs are shared by module-scoped fixtures.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import warnings
from importlib.metadata import entry_points
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("axolotl")

import torch  # noqa: E402
import yaml  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LORA_YAML = ROOT / "example_yamls" / "axolotl_lora_procon.yaml"
FULL_YAML = ROOT / "example_yamls" / "axolotl_full_procon.yaml"
PLUGIN = "safeguard_plugin.integrations.axolotl.SafeguardPlugin"
BIN = Path(sys.executable).parent
NOT_ACTIVE = "this Axolotl config has a `safeguard:` block, but the safeguard plugin is not active"
ENTRY_POINTS = {
    "pydantic": ("safeguard_axolotl_guard", "safeguard_plugin.integrations.axolotl.guard:guard"),
    "axolotl.cli_commands": ("safeguard", "safeguard_plugin.integrations.axolotl.cli:safeguard"),
}


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """``tiny-model/`` (random 4-layer Qwen2 + ChatML tokenizer) and ``data.jsonl``, as the example YAMLs expect."""
    from safeguard_plugin.testing import tiny_model, tiny_tokenizer

    ws = tmp_path_factory.mktemp("axolotl-ws")
    tiny_model().save_pretrained(ws / "tiny-model")
    tiny_tokenizer().save_pretrained(ws / "tiny-model")
    with open(ws / "data.jsonl", "w") as f:
        for a in range(8):
            for b in range(4):
                f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                                 {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}) + "\n")
    return ws


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Environment for Axolotl subprocesses: offline, no telemetry, this venv's executables first on PATH.

    Until pyproject.toml declares the plugin's entry points (the pydantic guard and the ``axolotl safeguard``
    command), they are provided by a throw-away dist-info on PYTHONPATH so the behaviour under test is real.
    """
    e = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", AXOLOTL_DO_NOT_TRACK="1",
             TOKENIZERS_PARALLELISM="false", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    e.pop("PYDANTIC_DISABLE_PLUGINS", None)
    missing = {g: v for g, v in ENTRY_POINTS.items()
               if not any(ep.value == v[1] for ep in entry_points(group=g))}
    if missing:
        warnings.warn(f"entry points not installed ({sorted(missing)}); using a test shim: add them to pyproject.toml",
                      stacklevel=1)
        shim = tmp_path_factory.mktemp("entry-point-shim")
        info = shim / "safeguard_plugin_axolotl_shim-0.0.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: safeguard-plugin-axolotl-shim\nVersion: 0.0.0\n")
        (info / "entry_points.txt").write_text("".join(f"[{g}]\n{n} = {v}\n\n" for g, (n, v) in missing.items()))
        e["PYTHONPATH"] = os.pathsep.join(p for p in (str(shim), e.get("PYTHONPATH")) if p)
    return e


def example(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def run_dir(workspace: Path, name: str, cfg: dict) -> Path:
    """A fresh directory laid out like the example YAMLs expect, holding ``cfg`` as ``run.yaml``."""
    d = workspace / name
    d.mkdir()
    for item in ("tiny-model", "data.jsonl"):
        (d / item).symlink_to(workspace / item)
    (d / "run.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return d


def axolotl(args: list[str], cwd: Path, env: dict, module: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "axolotl.cli.train", *args] if module else [str(BIN / "axolotl"), *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600)
    proc.output = proc.stdout  # type: ignore[attr-defined]
    return proc


def show(proc) -> str:
    return "\n".join(proc.output.splitlines()[-60:])


def tensors(folder: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(folder / name))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# ------------------------------------------------------------------------------------ (1) schema and guard
@pytest.fixture(scope="module")
def registered_plugin():
    from axolotl.integrations.base import PluginManager

    pm = PluginManager.get_instance()
    pm.register(PLUGIN)
    assert PLUGIN in pm.plugins
    return pm.plugins[PLUGIN]


@pytest.mark.parametrize("edit, key", [
    (lambda s: s["procon"].update(weight=-1), "safeguard.procon.weight: Input should be greater than or equal to 0"),
    (lambda s: s["procon"].update(wieght=1), "safeguard.procon.wieght"),
    (lambda s: s.update(procn={}), "safeguard.procn: unknown key"),
    (lambda s: s.update(nan_policy="ignore"), "safeguard.nan_policy"),
    (lambda s: s.pop("artifact"), "safeguard.artifact: required by procon"),
    (lambda s: s.pop("procon"), "safeguard: "),
])
def test_schema_errors_name_the_yaml_key(workspace, registered_plugin, monkeypatch, edit, key):
    """Through Axolotl's own validation (plugin args merged into its config class)."""
    from axolotl.utils.config import validate_config
    from axolotl.utils.dict import DictDefault
    from pydantic import ValidationError

    monkeypatch.chdir(workspace)
    cfg = example(LORA_YAML)
    edit(cfg["safeguard"])
    with pytest.raises(ValidationError) as err:
        validate_config(DictDefault(cfg))
    assert key in str(err.value)


def test_valid_block_uses_our_schema(workspace, registered_plugin, monkeypatch):
    from axolotl.utils.config import validate_config
    from axolotl.utils.dict import DictDefault

    from safeguard_plugin.integrations.axolotl.args import SafeguardArgs
    from safeguard_plugin.integrations.axolotl.plugin import safeguard_block

    monkeypatch.chdir(workspace)
    assert registered_plugin.get_input_args() == f"{SafeguardArgs.__module__}.{SafeguardArgs.__name__}"
    cfg = validate_config(DictDefault(example(LORA_YAML)))
    sg = safeguard_block(cfg)
    assert sg.section("procon").weight == 100.0 and sg.artifact == "./safeguard-artifacts/tiny-model"


def test_guard_refuses_block_only_without_the_plugin_field(registered_plugin):
    from axolotl.integrations.config import merge_input_args
    from axolotl.utils.schemas.config import AxolotlInputConfig

    from safeguard_plugin.integrations.axolotl.guard import SafeguardNotActiveError, check_config, guard

    data = {"plugins": ["safeguard_plugin.integrations.axolotl.SafeguardPlgin"], "safeguard": {"procon": {}}}
    with pytest.raises(SafeguardNotActiveError, match="misspelled"):
        check_config(AxolotlInputConfig, data)
    check_config(AxolotlInputConfig, {"safeguard": None})  # no block: nothing to guard
    _, merged = merge_input_args()  # our plugin registered: the class has the field
    check_config(merged, data)
    # handlers only for Axolotl's config classes
    assert guard.new_schema_validator(None, merged, None, "BaseModel", None, {})[0] is not None
    assert guard.new_schema_validator(None, SimpleNamespace, None, "BaseModel", None, {}) == (None, None, None)


def test_gradient_checkpointing_is_refused_with_a_block():
    from axolotl.utils.dict import DictDefault

    from safeguard_plugin.integrations.axolotl.plugin import SafeguardPlugin

    cfg = example(LORA_YAML)
    SafeguardPlugin().pre_model_load(DictDefault(cfg))  # off: fine
    with pytest.raises(ValueError, match="gradient_checkpointing: false"):
        SafeguardPlugin().pre_model_load(DictDefault({**cfg, "gradient_checkpointing": True}))


# ------------------------------------------------------------------------------------ (2) real LoRA runs
def lora_run(workspace: Path, env: dict, name: str, cfg: dict) -> SimpleNamespace:
    d = run_dir(workspace, f"lora-{name}", cfg)
    proc = axolotl(["train", "run.yaml", "--launcher", "python"], d, env)
    assert proc.returncode == 0, show(proc)
    return SimpleNamespace(proc=proc, dir=d, out=d / cfg["output_dir"])


@pytest.fixture(scope="module")
def lora_runs(workspace, env):
    """The LoRA example with the block (artifact missing -> calibrated in the run) and without it (plugin kept)."""
    with_block = example(LORA_YAML)
    without = copy.deepcopy(with_block)
    del without["safeguard"]
    return {"procon": lora_run(workspace, env, "procon", with_block), "plain": lora_run(workspace, env, "plain", without)}


def test_lora_run_banner_calibration_and_metrics(lora_runs):
    run = lora_runs["procon"]
    out = run.proc.output
    assert "[axolotl.integrations.safeguard] ====" in out and f"Axolotl plugin {PLUGIN} is active" in out
    assert "constraint procon: weight=100.0" in out
    assert "not found; calibrating" in out and (run.dir / "safeguard-artifacts/tiny-model/manifest.json").is_file()
    assert "training PeftModelForCausalLM (PEFT adapters); gradient accumulation 2" in out
    steps = [line for line in out.splitlines() if "'safeguard/procon_loss'" in line]
    assert len(steps) == 4, show(run.proc)  # every logged step of Axolotl's own step logs
    summary = json.loads((run.out / "safeguard_run.json").read_text())
    history = summary["log_history"]  # trainer.state.log_history entries
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    assert all(h["safeguard/position_coverage"] == 1.0 and "loss" in h for h in history)
    assert history[0]["safeguard/procon_loss"] < 1e-6 < history[-1]["safeguard/procon_loss"]  # zero at step 0
    assert summary["optimizer_steps"] == 4
    # post_train runs twice in Axolotl; the work (and its log line) happens once
    assert out.count("safeguard_run.json") == 1


def test_lora_weights_differ_from_the_run_without_the_block(lora_runs):
    name = "adapter_model.safetensors"
    procon, plain = (tensors(lora_runs[k].out, name) for k in ("procon", "plain"))
    assert "no `safeguard:` block in this config" in lora_runs["plain"].proc.output
    assert "safeguard/" not in "".join(line for line in lora_runs["plain"].proc.output.splitlines() if "'loss'" in line)
    assert max_diff(procon, plain) > 1e-4


def test_pre_lora_load_seeds_adapter_init():
    from axolotl.utils.dict import DictDefault

    from safeguard_plugin.integrations.axolotl.plugin import SafeguardPlugin

    draws = []
    for noise in (0, 1):
        torch.manual_seed(noise)
        SafeguardPlugin().pre_lora_load(DictDefault({"seed": 3}), model=None)
        draws.append(torch.rand(4))
    assert torch.equal(*draws)


@pytest.mark.slow
def test_zero_weight_is_bit_identical_to_no_block(workspace, env, lora_runs):
    """Control: seeded LoRA init + weight 0 = the run without the block, bit for bit (one more ~20 s run)."""
    cfg = example(LORA_YAML)
    cfg["safeguard"]["procon"]["weight"] = 0.0
    zero = lora_run(workspace, env, "zero", cfg)
    name = "adapter_model.safetensors"
    assert max_diff(tensors(zero.out, name), tensors(lora_runs["plain"].out, name)) == 0.0


# ------------------------------------------------------------------------ (3), (4) block without the plugin
def test_block_without_plugin_fails_the_run(workspace, env):
    cfg = example(LORA_YAML)
    del cfg["plugins"]
    d = run_dir(workspace, "no-plugin", cfg)
    proc = axolotl(["train", "run.yaml", "--launcher", "python"], d, env)
    assert proc.returncode != 0
    assert NOT_ACTIVE in proc.output and "does not list" in proc.output, show(proc)
    assert not (d / cfg["output_dir"] / "adapter_model.safetensors").exists()


def test_misspelled_plugin_still_fails_the_run(workspace, env):
    cfg = example(LORA_YAML)
    cfg["plugins"] = ["safeguard_plugin.integrations.axolotl_plugin.SafeguardPlugin"]
    d = run_dir(workspace, "typo", cfg)
    proc = axolotl(["run.yaml"], d, env, module=True)  # the entry `accelerate launch -m axolotl.cli.train` uses
    assert proc.returncode != 0
    assert "Failed to load plugin" in proc.output  # Axolotl swallowed the import error ...
    assert NOT_ACTIVE in proc.output and "misspelled?" in proc.output, show(proc)  # ... the guard did not


# ------------------------------------------------------------------ CLI calibration, then full fine-tuning
def test_cli_calibrate_then_full_finetune(workspace, env):
    cfg = example(FULL_YAML)
    d = run_dir(workspace, "full", cfg)
    proc = axolotl(["safeguard", "calibrate", "run.yaml"], d, env)
    assert proc.returncode == 0, show(proc)
    manifest = d / "safeguard-artifacts/tiny-model/manifest.json"
    assert manifest.is_file() and f"safeguard artifact: {manifest.parent.resolve()}" in proc.output

    proc = axolotl(["train", "run.yaml", "--launcher", "python"], d, env)
    assert proc.returncode == 0, show(proc)
    out = proc.output
    assert "safeguard: using artifact" in out and "not found; calibrating" not in out
    assert "training Qwen2ForCausalLM;" in out  # full fine-tuning: no PEFT wrapper
    assert "safeguard: reference values" in out  # original projections cached before the first step
    history = json.loads((d / cfg["output_dir"] / "safeguard_run.json").read_text())["log_history"]
    assert len(history) == 4 and history[-1]["safeguard/procon_loss"] > 0
    trained = tensors(d / cfg["output_dir"], "model.safetensors")
    base = tensors(workspace / "tiny-model", "model.safetensors")
    assert max_diff({k: trained[k] for k in base}, base) > 0


# ---------------------------------------------------------------------------------- (5) post_train twice
def test_post_train_is_idempotent(tmp_path):
    from axolotl.utils.dict import DictDefault

    from safeguard_plugin.config import load_config
    from safeguard_plugin.integrations.axolotl.plugin import RUN_FILE, SafeguardPlugin

    class Engine:
        config = load_config({"artifact": "a", "procon": {}})
        artifact, constraints, stop_reason = None, [], None
        optimizer_steps_seen, n_rows, n_rows_found, nan_skipped = 3, 4, 4, 0
        detached = 0

        def banner(self):
            return "safeguard active: test"

        def detach(self):
            self.detached += 1

    engine = Engine()
    trainer = SimpleNamespace(state=SimpleNamespace(log_history=[{"loss": 1.0, "safeguard/penalty": 0.5, "step": 1},
                                                                 {"train_loss": 1.0}]),
                              is_world_process_zero=lambda: True)
    plugin = SafeguardPlugin()
    plugin.callback = SimpleNamespace(engine=engine, trainer=trainer)
    cfg = DictDefault({"output_dir": str(tmp_path)})
    plugin.post_train(cfg, model=None)
    first = (tmp_path / RUN_FILE).read_text()
    (tmp_path / RUN_FILE).unlink()
    plugin.post_train(cfg, model=None)
    assert engine.detached == 1 and not (tmp_path / RUN_FILE).exists()
    assert json.loads(first)["log_history"] == [{"loss": 1.0, "safeguard/penalty": 0.5, "step": 1}]
    SafeguardPlugin().post_train(cfg, model=None)  # never attached (no block): a no-op
