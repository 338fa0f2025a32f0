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
from importlib.util import find_spec
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
GUARDSPACE_YAML = ROOT / "example_yamls" / "axolotl_lora_guardspace.yaml"
# what the trainer's saves (every checkpoint-N) and post_train (output_dir) write under GuardSpace
GUARDSPACE_FILES = {"adapter_config.json", "adapter_model.safetensors", "guardspace.json", "guardspace.safetensors"}
QLORA_YAML = ROOT / "example_yamls" / "axolotl_qlora_adaptive_kl.yaml"
ZERO2_YAML = ROOT / "example_yamls" / "axolotl_deepspeed_zero2_procon.yaml"
ZERO3_YAML = ROOT / "example_yamls" / "axolotl_deepspeed_zero3_procon.yaml"
KERNELS = ("lora_qkv_kernel", "lora_o_kernel", "lora_mlp_kernel")
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
    (d / "deepspeed_configs").symlink_to(ROOT / "example_yamls" / "deepspeed_configs")
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


def test_gradient_checkpointing_is_made_non_reentrant():
    """Axolotl defaults to reentrant checkpointing, whose no-grad forward hides the layer activations from the
    constraints (the run would crash at the first step): the plugin picks non-reentrant, refuses an explicit true."""
    from axolotl.utils.dict import DictDefault

    from safeguard_plugin.integrations.axolotl.plugin import SafeguardPlugin

    cfg = DictDefault({**example(LORA_YAML), "gradient_checkpointing": True})
    SafeguardPlugin().register(cfg)
    assert cfg["gradient_checkpointing_kwargs"] == {"use_reentrant": False}
    SafeguardPlugin().pre_model_load(cfg)
    for hook in ("register", "pre_model_load"):
        bad = DictDefault({**example(LORA_YAML), "gradient_checkpointing": True,
                           "gradient_checkpointing_kwargs": {"use_reentrant": True}})
        with pytest.raises(ValueError, match=r"gradient_checkpointing_kwargs: \{use_reentrant: false\}"):
            getattr(SafeguardPlugin(), hook)(bad)
    plain_cfg = DictDefault({**example(LORA_YAML), "gradient_checkpointing": True})
    del plain_cfg["safeguard"]
    SafeguardPlugin().register(plain_cfg)  # no block: Axolotl's defaults are left alone
    assert plain_cfg.get("gradient_checkpointing_kwargs") is None


def test_guardspace_fused_kernels_are_switched_off_or_refused(workspace, registered_plugin, monkeypatch):
    """Axolotl 0.19 turns its fused LoRA kernels on for `adapter: lora` (on CPU too: checked below through its own
    validation); they bypass the LoRA forward, so with GuardSpace the plugin turns them off or names the keys."""
    from axolotl.cli.config import gpu_capabilities
    from axolotl.utils.config import validate_config
    from axolotl.utils.dict import DictDefault
    from pydantic import ValidationError

    from safeguard_plugin.integrations.axolotl.plugin import SafeguardPlugin

    monkeypatch.chdir(workspace)
    caps, env_caps = gpu_capabilities()
    gs = example(GUARDSPACE_YAML)
    assert not any(k in gs for k in (*KERNELS, "lora_embedding_kernel"))  # the example leaves them unset
    procon = {k: v for k, v in example(LORA_YAML).items() if "kernel" not in k}
    on = validate_config(DictDefault(copy.deepcopy(procon)), capabilities=caps, env_capabilities=env_caps)
    assert all(on[k] is True for k in KERNELS)  # Axolotl's default without GuardSpace
    # Python API (no register hook): the config-level validator switches them off
    off = validate_config(DictDefault(copy.deepcopy(gs)), capabilities=caps, env_capabilities=env_caps)
    assert all(off[k] is False for k in KERNELS)
    # `axolotl train` path: register sees the YAML before validation
    cfg = DictDefault(copy.deepcopy(gs))
    SafeguardPlugin().register(cfg)
    assert all(cfg[k] is False for k in KERNELS)
    with pytest.raises(ValueError, match="lora_qkv_kernel, lora_mlp_kernel.*`lora_qkv_kernel: false`"):
        SafeguardPlugin().register(DictDefault({**gs, "lora_qkv_kernel": True, "lora_mlp_kernel": True}))
    with pytest.raises(ValueError, match="lora_o_kernel"):  # still on when the model is about to be built
        SafeguardPlugin().pre_model_load(DictDefault({**gs, "lora_o_kernel": True}))
    full = {k: v for k, v in gs.items() if not k.startswith("lora_") and k != "adapter"}
    with pytest.raises(ValidationError, match="safeguard.guardspace: needs `adapter: lora`"):
        validate_config(DictDefault(full), capabilities=caps, env_capabilities=env_caps)


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
    # the model card in output_dir: the "Safety fine-tuning" section (with the HF tags) beside what Axolotl wrote
    card = (run.out / "README.md").read_text()
    assert card.count("## Safety fine-tuning") == 1 and "- safeguard-plugin" in card and "- procon" in card
    assert summary["constraints"][0]["name"] == "procon" and summary["schema_version"]


def test_lora_weights_differ_from_the_run_without_the_block(lora_runs):
    name = "adapter_model.safetensors"
    procon, plain = (tensors(lora_runs[k].out, name) for k in ("procon", "plain"))
    assert "no `safeguard:` block in this config" in lora_runs["plain"].proc.output
    assert "safeguard/" not in "".join(line for line in lora_runs["plain"].proc.output.splitlines() if "'loss'" in line)
    assert max_diff(procon, plain) > 1e-4


def test_lora_init_is_seeded_from_the_yaml_and_calibration_leaves_it(tmp_path):
    """pre_lora_load seeds torch with the YAML's `seed:` (Axolotl 0.19 seeds nothing before the LoRA initialisation and
    torch starts each process from a random seed, checked below), and says so in the banner; a calibration inside the
    run (pre_lora_load for GuardSpace/CWAC, post_model_load otherwise) runs on a forked RNG, so whether the artifact
    was there or calibrated does not change what LoRA or the trainer draw next."""
    import random

    from axolotl.utils.dict import DictDefault

    from safeguard_plugin.integrations.axolotl.plugin import (
        SafeguardPlugin,
        ensure_artifact,
        safeguard_block,
        user_rng_untouched,
    )
    from safeguard_plugin.testing import tiny_model, tiny_tokenizer

    fresh = [subprocess.run([sys.executable, "-c", "import torch; print(torch.initial_seed())"], text=True,
                            capture_output=True, check=True).stdout for _ in range(2)]
    assert fresh[0] != fresh[1]  # unseeded, two processes draw different LoRA initialisations
    draws = []
    for noise in (0, 1):
        torch.manual_seed(noise)
        SafeguardPlugin().pre_lora_load(DictDefault({"seed": 3}), model=None)
        draws.append(torch.rand(4))
    assert torch.equal(*draws)

    model, tok = tiny_model(), tiny_tokenizer()
    cfg = DictDefault({**example(LORA_YAML), "base_model": "tiny"})
    cfg["safeguard"]["artifact"] = str(tmp_path / "art")
    torch.manual_seed(123)
    random.seed(5)
    state = torch.get_rng_state(), random.getstate()
    ensure_artifact(cfg, safeguard_block(cfg), model, tok)  # what post_model_load does when the artifact is missing
    assert (tmp_path / "art" / "manifest.json").is_file()
    with user_rng_untouched():
        torch.rand(8), random.random()
    assert torch.equal(torch.get_rng_state(), state[0]) and random.getstate() == state[1]


def test_lora_init_is_the_same_with_and_without_the_block(workspace, env):
    """The LoRA example as written (ProCon at weight 100, its artifact calibrated inside the run) against the same YAML
    without the `safeguard:` block, both at learning_rate 0 so the saved adapter is the initial one: identical, and
    the banner says how the initialisation was seeded."""
    cfg = example(LORA_YAML)
    cfg["learning_rate"] = 0.0
    without = copy.deepcopy(cfg)
    del without["safeguard"]
    block, plain = (lora_run(workspace, env, f"init-{k}", c) for k, c in (("block", cfg), ("plain", without)))
    assert "constraint procon: weight=100.0" in block.proc.output and "not found; calibrating" in block.proc.output
    for run in (block, plain):
        assert "LoRA init: torch seeded with 0 (the YAML's `seed:`) just before Axolotl creates the adapters" \
               in run.proc.output, show(run.proc)
    name = "adapter_model.safetensors"
    a, b = tensors(block.out, name), tensors(plain.out, name)
    assert max(v.abs().max().item() for k, v in a.items() if "lora_A" in k) > 0  # a real (random) initialisation
    assert max_diff(a, b) == 0.0


@pytest.mark.slow
def test_zero_weight_is_bit_identical_to_no_block(workspace, env, lora_runs):
    """Control: seeded LoRA init + weight 0 = the run without the block, bit for bit (one more ~20 s run)."""
    cfg = example(LORA_YAML)
    cfg["safeguard"]["procon"]["weight"] = 0.0
    zero = lora_run(workspace, env, "zero", cfg)
    name = "adapter_model.safetensors"
    assert max_diff(tensors(zero.out, name), tensors(lora_runs["plain"].out, name)) == 0.0


def test_gradient_checkpointing_keeps_the_penalty(workspace, env, lora_runs):
    """`gradient_checkpointing: true`: the penalty is logged every step and the adapter equals the run without
    checkpointing (same seed), not the run without the block -- a lost penalty would give the latter."""
    cfg = example(LORA_YAML)
    cfg["gradient_checkpointing"] = True
    run = lora_run(workspace, env, "checkpointing", cfg)
    out = run.proc.output
    assert "gradient checkpointing: non-reentrant (use_reentrant: false set by the plugin" in out
    assert '"use_reentrant": false' in out  # Axolotl's resolved config
    history = json.loads((run.out / "safeguard_run.json").read_text())["log_history"]
    assert [h["step"] for h in history] == [1, 2, 3, 4] and history[-1]["safeguard/procon_loss"] > 1e-6
    name = "adapter_model.safetensors"
    gc, procon, plain = (tensors(r.out, name) for r in (run, lora_runs["procon"], lora_runs["plain"]))
    d_procon, d_plain = max_diff(gc, procon), max_diff(gc, plain)
    assert d_procon < 1e-2 * d_plain and d_plain > 1e-4, (d_procon, d_plain)


# ------------------------------------------------------------------------- offline telemetry, README as written
TELEMETRY = """
import os
import axolotl.cli.config as c  # creates Axolotl's TelemetryManager (reads AXOLOTL_DO_NOT_TRACK once, here)
from safeguard_plugin.integrations.axolotl import guard
print("TELEMETRY", c.TELEMETRY_MANAGER.enabled, os.environ.get("AXOLOTL_DO_NOT_TRACK"), guard.telemetry_note)
"""


@pytest.mark.parametrize("track", [None, "0"])
def test_offline_switches_axolotl_telemetry_off_before_it_starts(env, track):
    """Offline (HF_HUB_OFFLINE=1), Axolotl 0.19's PostHog sender retries and the process hangs at exit. Its manager
    reads AXOLOTL_DO_NOT_TRACK when axolotl.cli.config is imported, before any plugin hook: the pydantic guard sets it
    first. An explicit choice is kept (and warned about when it keeps telemetry on offline)."""
    e = {k: v for k, v in env.items() if k not in ("AXOLOTL_DO_NOT_TRACK", "DO_NOT_TRACK")}
    if track is not None:
        e["AXOLOTL_DO_NOT_TRACK"] = track
    proc = subprocess.run([sys.executable, "-c", TELEMETRY], env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=300)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("TELEMETRY ")), proc.stdout[-2000:])
    if track is None:
        assert line.startswith("TELEMETRY False 1   telemetry: Axolotl's telemetry switched off (AXOLOTL_DO_NOT_TRACK=1 "
                               "set by safeguard-plugin because HF_HUB_OFFLINE=1"), line
    else:
        assert line.startswith("TELEMETRY True 0   WARNING: HF_HUB_OFFLINE=1 (offline) but Axolotl's telemetry is on "
                               "(AXOLOTL_DO_NOT_TRACK=0)"), line


README_MARKER = "<!-- axolotl quick start: run as written by tests/test_axolotl.py -->"


def test_readme_axolotl_commands_work_as_written(tmp_path, env):
    """The main README's Axolotl block, line for line, from a folder laid out like the repository: the venv activated
    by its own `activate` (not already on PATH), no AXOLOTL_DO_NOT_TRACK/HF_HUB_OFFLINE but what the block sets, and
    nothing prepared beforehand (`safeguard example-data` writes the model and data)."""
    block = (ROOT / "README.md").read_text().split(README_MARKER, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip()]
    assert lines[:2] == ["scripts/axolotl_env.sh", ". .venv-axolotl/bin/activate"], lines  # set-up: this very venv
    script = "\n".join(["set -euo pipefail", f". {BIN / 'activate'}", *lines[2:]])
    (tmp_path / "example_yamls").symlink_to(ROOT / "example_yamls")
    e = {k: v for k, v in env.items()
         if k not in ("AXOLOTL_DO_NOT_TRACK", "DO_NOT_TRACK", "HF_HUB_OFFLINE", "WANDB_MODE", "VIRTUAL_ENV")}
    e["PATH"] = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if Path(p) != BIN)
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=e, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=900)
    out = proc.stdout
    assert proc.returncode == 0, "\n".join(out.splitlines()[-60:])
    assert "Axolotl's telemetry switched off (AXOLOTL_DO_NOT_TRACK=1 set by safeguard-plugin" in out
    assert "posthog" not in out.lower()  # before: PostHog's retries to us.i.posthog.com, and a hang where DNS answers
    assert "Model successfully saved" in out and sum("'safeguard/procon_loss'" in x for x in out.splitlines()) == 4
    assert (tmp_path / "axolotl-example" / "outputs" / "lora-procon" / "adapter_model.safetensors").is_file()


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


# ------------------------------------------------------------------------------------ GuardSpace end to end
@pytest.fixture(scope="module")
def guardspace_run(workspace, env):
    """The GuardSpace example as written (fused kernels left to the plugin), plus checkpoints at steps 2 and 4."""
    cfg = example(GUARDSPACE_YAML)
    cfg.update(save_strategy="steps", save_steps=2)
    return lora_run(workspace, env, "guardspace", cfg)


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_guardspace_run_kernels_off_and_adapters_saved(guardspace_run):
    run = guardspace_run
    out = run.proc.output
    assert "guardspace: fused LoRA kernels lora_qkv_kernel, lora_o_kernel, lora_mlp_kernel off (switched off by the " \
           "plugin" in out
    assert '"lora_qkv_kernel": false' in out  # Axolotl's resolved config
    # GuardSpace calibrated on the pre-LoRA model, and its first-step check (projected lora_A called) passed
    assert "not found; calibrating" in out and "guardspace" in (run.dir / "safeguard-artifacts/tiny-model-guardspace/"
                                                                 "manifest.json").read_text()
    summary = json.loads((run.out / "safeguard_run.json").read_text())
    assert summary["optimizer_steps"] == 4
    assert [Path(p) for p in summary["adapters"]] == [Path(example(GUARDSPACE_YAML)["output_dir"])]
    assert all(h["safeguard/guardspace_update_norm"] > 0 for h in summary["log_history"])
    # the trainer's own checkpoint saves go through GuardSpace (and post_train writes output_dir): the standard
    # layout, directly in the folder, logged with the folder as the YAML names it (./outputs/lora-guardspace)
    lora_r, output_dir = example(GUARDSPACE_YAML)["lora_r"], example(GUARDSPACE_YAML)["output_dir"]
    for rel in [os.path.join(output_dir, f"checkpoint-{step}") for step in (2, 4)] + [output_dir]:
        folder = run.dir / rel
        assert f"guardspace wrote the trained model to {rel}; projector included" in out, rel
        assert GUARDSPACE_FILES <= {p.name for p in folder.iterdir()}, rel
        assert not (folder / "guardspace").exists() and not (folder / "model.safetensors").exists(), rel
        assert json.loads((folder / "adapter_config.json").read_text())["r"] == 2 * lora_r, rel  # [B, -B0][A P; A0 P]
    # post_train runs twice; the second call (after Axolotl's own save) puts the complete adapter back
    assert out.index("Model successfully saved to") < out.index("writing the trained model over the one Axolotl saved") \
        < out.rindex(f"guardspace wrote the trained model to {output_dir}; projector included")


def test_guardspace_output_dir_reloads_the_trained_model(workspace, guardspace_run):
    """load_guardspace(base, output_dir) == the trained model, rebuilt independently from what the trainer itself saved
    at the last step (checkpoint-4: the GuardSpace factors) + the artifact (residual, projector), as a resume would;
    checkpoint-4 and output_dir both load as that model through vanilla PEFT and through load_guardspace."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file as load_st
    from transformers import AutoModelForCausalLM

    from safeguard_plugin.artifacts import Artifact
    from safeguard_plugin.constraints.guardspace import (
        GuardSpace,
        GuardSpaceConfig,
        guardspace_layers,
        load_guardspace,
        restore_guardspace_factors,
    )

    run = guardspace_run
    yaml = example(GUARDSPACE_YAML)

    def base():
        return AutoModelForCausalLM.from_pretrained(workspace / "tiny-model", dtype=torch.float32)

    def lora(model):  # the YAML's adapter as Axolotl builds it (lora_target_linear: every Linear but the LM head)
        return get_peft_model(model, LoraConfig(r=yaml["lora_r"], lora_alpha=yaml["lora_alpha"], lora_dropout=0.0,
                                                target_modules="all-linear"))

    ids = torch.randint(3, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    reloaded = _logits(load_guardspace(base(), run.out), ids)
    # 1) the trained model, rebuilt from the trainer's own final save and the artifact, the way a resume rebuilds it:
    # a fresh rank-r LoRA, GuardSpace surgery from the artifact, then the checkpoint's trained factors
    ckpt = run.out / "checkpoint-4"
    trained = lora(base())
    gs_cfg = GuardSpaceConfig(**yaml["safeguard"]["guardspace"])
    GuardSpace(gs_cfg, Artifact.load(run.dir / "safeguard-artifacts/tiny-model-guardspace")).modify_model(trained)
    assert restore_guardspace_factors(trained, ckpt)  # surgery re-initialised A, B: put the trained factors back
    assert (reloaded - _logits(trained, ids)).abs().max() < 1e-5
    # 2) the saved trainable factors are the trainer's own (checkpoint-4 = the final step)
    gs_saved = load_st(str(run.out / "guardspace.safetensors"))
    for key, layer in guardspace_layers(trained).items():
        for f in ("lora_A", "lora_B"):
            assert torch.equal(gs_saved[f"{key}.{f}"], getattr(layer, f)["default"].weight.detach())
    # 3) output_dir and checkpoint-4 hold the exported adapter (projector folded in): vanilla PEFT gives the same
    # model, and so does load_guardspace
    assert (_logits(PeftModel.from_pretrained(base(), run.out), ids) - reloaded).abs().max() < 1e-4
    assert (_logits(PeftModel.from_pretrained(base(), ckpt), ids) - reloaded).abs().max() < 1e-4
    assert (_logits(load_guardspace(base(), ckpt), ids) - reloaded).abs().max() < 1e-5
    # 4) ... while the plain LoRA save the trainer would have written (the same factors, no projector, no residual)
    # is another model
    plain = lora(base())
    factors = dict(trained.named_parameters())
    with torch.no_grad():
        names = [name for name, _ in plain.named_parameters() if "lora_" in name]
        assert names and all(name in factors for name in names)
        for name, p in plain.named_parameters():
            if "lora_" in name:
                p.copy_(factors[name])
    assert (_logits(plain, ids) - reloaded).abs().max() > 1e-3
    assert (_logits(base(), ids) - reloaded).abs().max() > 1e-4  # and training moved the model


# ----------------------------------------------------------------------------------------- every example YAML
VALIDATE = """
import json, sys
import axolotl.cli.config as axcfg
from axolotl.integrations.base import PluginManager
from safeguard_plugin.integrations.axolotl.args import plain

out = {}
for path in sys.argv[1:]:
    r = out[path] = {}
    if "\\ndeepspeed:" in open(path).read():
        # load_cfg ends by opening DeepSpeed's process group (prepare_optim_env): not validation, and runs DeepSpeed
        axcfg.prepare_optim_env = lambda cfg: None
    try:
        cfg = axcfg.load_cfg(path, base_model="./tiny-model")  # offline: the tiny model stands in for hub models
    except Exception as e:
        r["error"] = f"{type(e).__name__}: {e}"
        continue
    r["safeguard"] = plain(cfg["safeguard"])
    r.update({k: cfg.get(k) for k in ("adapter", "load_in_4bit", "lora_qkv_kernel", "lora_o_kernel", "lora_mlp_kernel",
                                      "gradient_checkpointing_kwargs")})
    ds = cfg.get("deepspeed")
    r["zero_stage"] = ds.get("zero_optimization", {}).get("stage") if isinstance(ds, dict) else ds
    try:
        PluginManager.get_instance().pre_model_load(cfg)  # the plugin's last check before the model is built
        r["pre_model_load"] = "ok"
    except Exception as e:
        r["pre_model_load"] = f"{type(e).__name__}: {e}"
print("RESULT " + json.dumps(out, default=str))
"""
AXOLOTL_EXAMPLES = sorted(p.name for p in (ROOT / "example_yamls").glob("axolotl_*.yaml"))


@pytest.fixture(scope="module")
def validated_examples(workspace, env):
    """Every example_yamls/axolotl_*.yaml through Axolotl's config loader (load_cfg), in one subprocess."""
    d = workspace / "validate"
    d.mkdir()
    for item in ("tiny-model", "data.jsonl"):
        (d / item).symlink_to(workspace / item)
    (d / "deepspeed_configs").symlink_to(ROOT / "example_yamls" / "deepspeed_configs")
    proc = subprocess.run([sys.executable, "-c", VALIDATE, *(str(ROOT / "example_yamls" / n) for n in AXOLOTL_EXAMPLES)],
                          cwd=d, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:]
    return {Path(k).name: v for k, v in json.loads(lines[-1][len("RESULT "):]).items()}


@pytest.mark.parametrize("name", AXOLOTL_EXAMPLES)
def test_example_yaml_validates_through_axolotl(validated_examples, name):
    r = validated_examples[name]
    assert "error" not in r, r.get("error")
    raw = example(ROOT / "example_yamls" / name)
    constraints = [k for k, v in raw["safeguard"].items() if isinstance(v, dict)]
    assert constraints and all(r["safeguard"][c]["enabled"] for c in constraints)  # our schema, nothing dropped
    if name == QLORA_YAML.name:
        # QLoRA is for GPUs: valid for Axolotl, and on this CPU machine the plugin stops it before the model is built
        assert r["adapter"] == "qlora" and r["load_in_4bit"] is True
        assert r["gradient_checkpointing_kwargs"] == {"use_reentrant": False}
        if torch.cuda.is_available():
            assert r["pre_model_load"] == "ok"
        else:
            assert r["pre_model_load"].startswith("ConfigError: safeguard: this config loads the base model quantized "
                                                  "(load_in_4bit: true), which needs bitsandbytes and a CUDA GPU")
        return
    assert r["pre_model_load"] == "ok"
    if "deepspeed" in name:
        assert r["zero_stage"] == int(name.split("zero")[1][0])
    if "guardspace" in raw["safeguard"]:
        assert [r[k] for k in KERNELS] == [False] * 3


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "example_yamls").glob("*.yaml")
                                        if not p.name.startswith("axolotl_")))
def test_trl_example_yaml_validates(name):
    from safeguard_plugin.integrations.axolotl.args import validate_block

    assert validate_block(example(ROOT / "example_yamls" / name)["safeguard"]).constraint_configs()


# ------------------------------------------------------------- CWAC and adaptive KL example YAMLs, trained
CWAC_LORA_YAML = ROOT / "example_yamls" / "axolotl_lora_cwac.yaml"
CWAC_FULL_YAML = ROOT / "example_yamls" / "axolotl_full_cwac.yaml"
AKL_LORA_YAML = ROOT / "example_yamls" / "axolotl_lora_adaptive_kl.yaml"
TRAINED_ELSEWHERE = {LORA_YAML, FULL_YAML, GUARDSPACE_YAML, ZERO2_YAML, ZERO3_YAML}  # fixtures above / below
GPU_ONLY = {QLORA_YAML}  # on CPU: validated, and refused before the model is built (test above)


def test_every_cpu_example_yaml_is_trained_by_a_test():
    """A CPU-sized example that no test trains could rot unnoticed: each one must be listed here and run."""
    trained = TRAINED_ELSEWHERE | {CWAC_LORA_YAML, CWAC_FULL_YAML, AKL_LORA_YAML}
    assert set(AXOLOTL_EXAMPLES) == {p.name for p in trained | GPU_ONLY}


@pytest.fixture(scope="module")
def example_runs(workspace, env):
    """``axolotl train`` of an example YAML as written (or edited), run once per module on first use."""
    runs: dict[str, SimpleNamespace] = {}

    def get(path: Path, key: str | None = None, edit=None) -> SimpleNamespace:
        key = key or path.stem
        if key not in runs:
            cfg = example(path)
            if edit is not None:
                edit(cfg)
            runs[key] = lora_run(workspace, env, key, cfg)
        return runs[key]

    return get


def _history(run) -> list[dict]:
    summary = json.loads((run.out / "safeguard_run.json").read_text())
    assert summary["optimizer_steps"] == 4
    return summary["log_history"]


def _step_log_lines(run, metric: str) -> int:
    return sum(f"'safeguard/{metric}'" in line for line in run.proc.output.splitlines())


@pytest.mark.parametrize("path", [CWAC_LORA_YAML, CWAC_FULL_YAML], ids=["lora", "full"])
def test_cwac_example_trains_with_both_parts(example_runs, workspace, path):
    run = example_runs(path)
    out = run.proc.output
    assert "constraint cwac" in out and "not found; calibrating" in out, show(run.proc)
    assert _step_log_lines(run, "cwac_sae_loss") == 4  # in Axolotl's own step logs, every step
    history = _history(run)
    assert all(h["safeguard/cwac_projected_matrices"] > 0 for h in history)
    assert history[0]["safeguard/cwac_sae_loss"] < 1e-6 < history[-1]["safeguard/cwac_sae_loss"]  # 0 before any update
    if path == CWAC_LORA_YAML:
        assert max(h["safeguard/cwac_subspace_leak"] for h in history) < 1e-5  # adapter updates stay outside
        return
    # full fine-tuning: the saved update ΔW = W - W0 of every matrix has no component in its calibrated subspace
    from safeguard_plugin.artifacts import Artifact

    trained = tensors(run.out, "model.safetensors")
    base = tensors(workspace / "tiny-model", "model.safetensors")
    assert max_diff({k: trained[k] for k in base}, base) > 0
    sub, _ = Artifact.load(run.dir / "safeguard-artifacts/tiny-model").component("cwac_subspace")
    worst, n = 0.0, 0
    for name, U in sub.items():
        if not (name.startswith("gradient.") and name.endswith(".U")):
            continue
        key = name[len("gradient."):-len(".U")]
        i, _, mod = key.partition(".")
        w = f"model.layers.{i}.{mod}.weight"
        dW = trained[w].float() - base[w].float()
        V = sub[f"gradient.{key}.V"]
        worst = max(worst, float(((U.T @ dW).norm() + (dW @ V).norm()) / dW.norm()))
        n += 1
    assert n > 0 and worst < 1e-4, worst


def test_adaptive_kl_example_trains_with_the_probe(example_runs):
    run = example_runs(AKL_LORA_YAML)
    out = run.proc.output
    assert "constraint adaptive_kl" in out and "not found; calibrating" in out, show(run.proc)
    assert "risk_probe" in (run.dir / "safeguard-artifacts/tiny-model-akl/manifest.json").read_text()
    assert _step_log_lines(run, "akl_kl") == 4
    history = _history(run)
    assert all(1.0 <= h["safeguard/akl_risk_mean"] <= 5.0 and 0.1 <= h["safeguard/akl_w_kl_mean"] <= 0.9
               for h in history)
    assert sum(h["safeguard/akl_ref_forwards"] for h in history) > 0  # the adapter-disabled reference ran
    assert history[0]["safeguard/akl_kl"] < 1e-6 < max(h["safeguard/akl_kl"] for h in history[1:])


def test_adaptive_kl_judge_runs_through_axolotl(example_runs):
    """The judge estimator through the same YAML, judged by the model being trained (adapters off, offline). The
    tiny random model answers garbage: every example gets the documented fallback (5) and is counted."""
    def judge(cfg):
        cfg["safeguard"]["adaptive_kl"].update(risk="judge", risk_options={
            "model": "reference", "max_new_tokens": 4, "validate_judge": False})

    run = example_runs(AKL_LORA_YAML, key="adaptive-kl-judge", edit=judge)
    out = run.proc.output
    assert "safeguard: judge risk scores" in out, show(run.proc)
    history = _history(run)
    assert history[-1]["safeguard/akl_judge_fallbacks"] == 32  # data.jsonl has 32 examples, each scored once
    assert all(h["safeguard/akl_risk_mean"] == 5.0 and h["safeguard/akl_w_kl_mean"] == pytest.approx(0.9)
               for h in history)


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
        model = "trained model"

        def banner(self):
            return "safeguard active: test"

        def detach(self):
            self.detached += 1
            self.model = None

    engine = Engine()
    trainer = SimpleNamespace(state=SimpleNamespace(log_history=[{"loss": 1.0, "safeguard/penalty": 0.5, "step": 1},
                                                                 {"train_loss": 1.0}]),
                              is_world_process_zero=lambda: True)
    plugin = SafeguardPlugin()
    saves = []
    plugin.callback = SimpleNamespace(engine=engine, trainer=trainer,
                                      save_adapters=lambda d: saves.append((d, engine.model)) or [])
    cfg = DictDefault({"output_dir": str(tmp_path)})
    plugin.post_train(cfg, model=None)
    first = (tmp_path / RUN_FILE).read_text()
    (tmp_path / RUN_FILE).unlink()
    plugin.post_train(cfg, model=None)
    # the second call (after Axolotl's own save) writes the same record again, not a new one
    assert engine.detached == 1 and (tmp_path / RUN_FILE).read_text() == first
    # adapters: both calls, with the trained model (the second follows Axolotl's own save and the engine's detach)
    assert saves == [(str(tmp_path), "trained model")] * 2 and engine.model is None
    assert json.loads(first)["log_history"] == [{"loss": 1.0, "safeguard/penalty": 0.5, "step": 1}]
    SafeguardPlugin().post_train(cfg, model=None)  # never attached (no block): a no-op


# ------------------------------------------------------------------- DeepSpeed through Axolotl (CPU, 1 process)
needs_deepspeed = pytest.mark.skipif(find_spec("deepspeed") is None,
                                     reason='deepspeed not installed in this venv (DS_BUILD_OPS=0 pip install '
                                            '"deepspeed>=0.18.6,<0.19.0" --no-build-isolation)')


@pytest.fixture(scope="module")
def deepspeed_runs(workspace, env):
    """The two DeepSpeed example YAMLs as written, 1 process on CPU (the plugin opens the gloo group Axolotl would
    open with NCCL), and the ZeRO-2 YAML without its `deepspeed:` line as the reference.

    zero2: artifact missing -> calibrated inside the DeepSpeed run; zero3: `axolotl safeguard calibrate` on the ZeRO-3
    YAML itself first (it loads the model without DeepSpeed); plain: zero2's artifact copied in (same model)."""
    import shutil

    runs = {"zero2": lora_run(workspace, env, "zero2", example(ZERO2_YAML))}
    z3 = run_dir(workspace, "lora-zero3", example(ZERO3_YAML))
    runs["zero3-calibrate"] = SimpleNamespace(proc=axolotl(["safeguard", "calibrate", "run.yaml"], z3, env))
    assert runs["zero3-calibrate"].proc.returncode == 0, show(runs["zero3-calibrate"].proc)
    proc = axolotl(["train", "run.yaml", "--launcher", "python"], z3, env)
    assert proc.returncode == 0, show(proc)
    runs["zero3"] = SimpleNamespace(proc=proc, dir=z3, out=z3 / example(ZERO3_YAML)["output_dir"])
    plain = example(ZERO2_YAML)
    del plain["deepspeed"]
    d = run_dir(workspace, "lora-zero2-plain", plain)
    shutil.copytree(runs["zero2"].dir / "safeguard-artifacts", d / "safeguard-artifacts")
    proc = axolotl(["train", "run.yaml", "--launcher", "python"], d, env)
    assert proc.returncode == 0, show(proc)
    runs["plain"] = SimpleNamespace(proc=proc, dir=d, out=d / plain["output_dir"])
    return runs


def _history(run) -> list[dict]:
    return json.loads((run.out / "safeguard_run.json").read_text())["log_history"]


@needs_deepspeed
@pytest.mark.deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_example_trains_on_cpu(deepspeed_runs, stage):
    run = deepspeed_runs[f"zero{stage}"]
    out = run.proc.output
    assert "deepspeed without CUDA: gloo process group opened (1 process" in out, show(run.proc)
    assert f"gradient accumulation 2 handled by the engine; DeepSpeed ZeRO-{stage}, 1 process (gloo)" in out
    summary = json.loads((run.out / "safeguard_run.json").read_text())
    assert summary["model_wrapped"] == "DeepSpeedEngine" and summary["deepspeed_zero_stage"] == stage
    assert "model trained as DeepSpeedEngine" in out
    if stage == 2:
        assert "not found; calibrating" in out  # inside the DeepSpeed run
    else:  # calibrated beforehand from the ZeRO-3 YAML itself (loaded without DeepSpeed), then used
        assert "not found; calibrating" in deepspeed_runs["zero3-calibrate"].proc.output
        assert "safeguard: using artifact" in out and "not found; calibrating" not in out
    history = _history(run)
    assert [h["step"] for h in history] == [1, 2, 3, 4] and summary["optimizer_steps"] == 4
    # ~0 at step 1 (no update yet), then the penalty works
    assert all(h["safeguard/procon_loss"] > 1e-3 for h in history[1:]), history


@needs_deepspeed
@pytest.mark.deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_example_matches_the_run_without_deepspeed(deepspeed_runs, stage):
    """Same YAML without `deepspeed:`: the same losses and adapter (fp32, 1 process). Measured here: ZeRO-2
    |dw| 1.5e-8, ZeRO-3 see the README; the adapter moved ~4e-3 from its init in both."""
    run, plain = deepspeed_runs[f"zero{stage}"], deepspeed_runs["plain"]
    assert "DeepSpeed ZeRO" not in plain.proc.output and '"model_wrapped": "PeftModelForCausalLM"' in (
        plain.out / "safeguard_run.json").read_text()
    name = "adapter_model.safetensors"
    dw = max_diff(tensors(run.out, name), tensors(plain.out, name))
    moved = max(v.abs().max().item() for k, v in tensors(plain.out, name).items() if "lora_B" in k)
    pairs = list(zip(_history(run), _history(plain), strict=True))
    dloss = max(abs(a[k] - b[k]) for a, b in pairs for k in ("loss", "safeguard/procon_loss"))
    print(f"zero{stage} vs no deepspeed: max |dw| {dw:.2e} (adapter B max {moved:.2e}), max |dloss| {dloss:.2e}")
    assert dw < 1e-3 * moved and dloss < 1e-3, (dw, moved, dloss)


# ------------------------------------------------------------- calibration once under a multi-process launch
CALIBRATE_WORKER = """
import hashlib, json, os, shutil, sys, time
import torch.distributed as dist

dist.init_process_group("gloo")
rank = dist.get_rank()
base, layout = sys.argv[1], sys.argv[2]
# 'nodes': every rank has its own working directory, as ranks on nodes without a shared filesystem do
os.chdir(os.path.join(base, f"node{rank}") if layout == "nodes" else base)

import safeguard_plugin.calibration as calibration
from safeguard_plugin.config import load_config
from safeguard_plugin.integrations.axolotl.plugin import ensure_artifact
from safeguard_plugin.testing import tiny_model, tiny_tokenizer

calls, real = [], calibration.calibrate
def counted(*args, **kwargs):
    calls.append(rank)
    time.sleep(2)  # slow rank 0 down: the others must wait for it, not race it
    return real(*args, **kwargs)
calibration.calibrate = counted

sg = load_config({"artifact": "./art", "procon": {}})
model, tok = tiny_model(), tiny_tokenizer()
out = {"rank": rank, "steps": []}

def step(name):
    try:
        path = ensure_artifact({"base_model": "tiny"}, sg, model, tok)
        digest = hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest()
        out["steps"].append([name, digest])
    except Exception as e:
        out["steps"].append([name, f"{type(e).__name__}: {e}"])

if layout == "bad":  # rank 0's folder is not an artifact: every rank must fail, none may hang
    step("bad")
else:
    step("calibrate")  # missing everywhere: rank 0 computes, the others wait (and, per node, receive it)
    if layout == "nodes" and rank == 1:
        shutil.rmtree("art")  # a node that lost it: receives rank 0's copy, nothing is recomputed
    step("again")
out["calls"] = calls
# one file per rank: two ranks printing to one pipe can interleave their lines
with open(os.path.join(base, f"result{rank}.json"), "w") as f:
    json.dump(out, f)
dist.destroy_process_group()
"""


def torchrun_calibrate(tmp_path: Path, env: dict, layout: str) -> dict[int, dict]:
    script = tmp_path / "worker.py"
    script.write_text(CALIBRATE_WORKER)
    for r in (0, 1):
        (tmp_path / f"node{r}").mkdir(exist_ok=True)
    proc = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path),
                           layout], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=300)
    files = [tmp_path / f"result{r}.json" for r in (0, 1)]
    assert proc.returncode == 0 and all(f.is_file() for f in files), proc.stdout[-4000:]
    results = [json.loads(f.read_text()) for f in files]
    return {r["rank"]: r for r in results}


@pytest.mark.parametrize("layout", ["shared", "nodes"])
def test_calibration_runs_once_under_torchrun(tmp_path, env, layout):
    """2 processes (torchrun, gloo, CPU), the plugin's ensure_artifact as post_model_load calls it: rank 0 calibrates
    once, rank 1 waits and then reads the same artifact -- from the shared folder, or (``nodes``: one working
    directory per rank, no shared filesystem) from a copy rank 0 sends it."""
    res = torchrun_calibrate(tmp_path, env, layout)
    assert res[0]["calls"] == [0] and res[1]["calls"] == []  # computed once, by rank 0
    for name in ("calibrate", "again"):
        digests = {res[r]["steps"][i][1] for r in (0, 1) for i, s in enumerate(res[r]["steps"]) if s[0] == name}
        assert len(digests) == 1 and len(next(iter(digests))) == 64, res  # the very same manifest on both ranks
    if layout == "nodes":
        assert (tmp_path / "node1/art/manifest.json").read_bytes() == (tmp_path / "node0/art/manifest.json").read_bytes()
        assert not (tmp_path / "art").exists()
    else:
        assert (tmp_path / "art/manifest.json").is_file()


def test_calibration_failure_on_rank0_reaches_every_rank(tmp_path, env):
    (tmp_path / "art").mkdir()
    (tmp_path / "art/notes.txt").write_text("not an artifact")
    res = torchrun_calibrate(tmp_path, env, "bad")
    assert res[0]["steps"][0][1].startswith("ArtifactError: refusing to write the artifact to "), res
    assert "is not a safeguard artifact" in res[0]["steps"][0][1] and "notes.txt" in res[0]["steps"][0][1]
    assert (tmp_path / "art/notes.txt").read_text() == "not an artifact"  # the user's file is still there
    assert res[1]["steps"][0][1].startswith("SafeguardRuntimeError: safeguard: calibrating art failed on rank 0: "
                                            "ArtifactError"), res


def test_fp16_is_accepted_and_cpu_multiprocess_deepspeed_is_refused(monkeypatch):
    """fp16 trains (the callback gives the injected penalty gradient the trainer's loss scale: tests/test_precision.py);
    DeepSpeed on CPU through Axolotl 0.19 works with 1 process only (see CPU_MULTI_PROCESS_MESSAGE)."""
    from axolotl.utils.dict import DictDefault

    from safeguard_plugin.integrations.axolotl.plugin import SafeguardPlugin, open_cpu_process_group

    SafeguardPlugin().pre_model_load(DictDefault({**example(LORA_YAML), "fp16": True}))  # no longer refused
    assert all(example(p)["fp16"] is False for p in (ZERO2_YAML, ZERO3_YAML))
    assert open_cpu_process_group(DictDefault(example(LORA_YAML))) is None  # no deepspeed: nothing to do
    if not torch.cuda.is_available():
        monkeypatch.setenv("WORLD_SIZE", "2")
        with pytest.raises(ValueError, match="DeepSpeed without CUDA with 2 processes.*1 process only"):
            open_cpu_process_group(DictDefault(example(ZERO2_YAML)))
