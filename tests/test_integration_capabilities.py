"""The integrations know no constraint by name: what a constraint needs from the run is declared on ``Constraint``
(capability flags, ``check_training``) and read generically; ``SafeguardCallback`` takes its trainer explicitly."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pydantic import ConfigDict, ValidationError

from safeguard_plugin import registry
from safeguard_plugin.constraints.base import Constraint, ConstraintConfig, TrainingSetup
from safeguard_plugin.errors import ConfigError

INTEGRATIONS = Path(__file__).resolve().parents[1] / "safeguard_plugin" / "integrations"
KERNELS = ("lora_qkv_kernel", "lora_o_kernel", "lora_mlp_kernel")

# ------------------------------------------------------------------------------------------ no names in code
_PART = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+")
_KEY_LIKE = re.compile(r"[\w.\-/:]+")  # an identifier, key path or file name, not a message
_FIELD = re.compile(r"\{[^{}]*\}")


def _named(word: str, names: set[str]) -> str | None:
    """The constraint name ``word`` is or contains as whole word parts (``uses_guardspace``, ``GuardSpaceConfig``,
    ``guardspace.json``; not ``procontrol``)."""
    parts = [p.lower() for p in _PART.findall(word)]
    for i in range(len(parts)):
        joined = ""
        for p in parts[i:]:
            joined += p
            if joined in names:
                return joined
    return None


def constraint_names_in_code(source: str, names: set[str]) -> list[tuple[int, str]]:
    """``(line, token)`` for each identifier and each identifier-like string literal (a key, path or file name: no
    spaces) naming a constraint. Comments, docstrings and messages (strings with spaces) are prose and may name them;
    f-string pieces count as strings."""
    hits = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME:
            text = tok.string
        elif tok.type == tokenize.STRING:
            try:
                text = ast.literal_eval(tok.string)
            except (ValueError, SyntaxError):  # an f-string (one token before Python 3.12): its text without fields
                text = _FIELD.sub("", tok.string.lstrip("rRbBfFuU").strip("\"'"))
            if not isinstance(text, str) or not _KEY_LIKE.fullmatch(text):
                continue
        elif tok.type == getattr(tokenize, "FSTRING_MIDDLE", -1):
            text = tok.string
            if not _KEY_LIKE.fullmatch(text):
                continue
        else:
            continue
        if _named(text, names):
            hits.append((tok.start[0], tok.string))
    return hits


def registry_names() -> set[str]:
    classes = registry.available_constraints()
    return {n.replace("_", "").lower() for n in classes} | {c.__name__.lower() for c in classes.values()}


def test_integrations_name_no_constraint_in_code():
    names = registry_names()
    assert {"guardspace", "procon", "adaptivekl"} <= names
    files = sorted(INTEGRATIONS.rglob("*.py"))
    assert len(files) >= 5
    found = [f"{p.relative_to(INTEGRATIONS)}:{line}: {tok}" for p in files
             for line, tok in constraint_names_in_code(p.read_text(), names)]
    assert not found, "constraint names in integration code (declare a Constraint capability instead):\n" + "\n".join(found)


def test_name_scan_finds_names_in_code_not_in_prose():
    names = {"guardspace", "procon", "adaptivekl"}
    code = '''
def uses_guardspace(block):
    """Whether GuardSpace is on (a docstring may say guardspace)."""
    # a comment about procon
    msg = "safeguard.guardspace: needs `adapter: lora`"
    ok = f"{name}: fused kernels off"
    return "guardspace" in block or GuardSpaceConfig or f"{x}.adaptive_kl" or "guardspace.json"
'''
    hits = [t for _, t in constraint_names_in_code(code, names)]
    assert hits[0] == "uses_guardspace" and '"guardspace"' in hits and "GuardSpaceConfig" in hits
    assert '"guardspace.json"' in hits and any("adaptive_kl" in h for h in hits)
    assert not any("needs" in h or "docstring" in h for h in hits)


# ------------------------------------------------------------------------------- capabilities, read generically
class CapableConfig(ConstraintConfig):
    pass


class Capable(Constraint):
    """A test constraint that declares every integration-facing capability and refuses packed rows."""

    name = "capable_test"
    config_class = CapableConfig
    requires_lora_adapter = True
    requires_unfused_lora = True
    seen: list[TrainingSetup] = []

    @classmethod
    def check_training(cls, config, setup):
        cls.seen.append(setup)
        if setup.packing:
            raise ConfigError("capable_test: needs one example per row (packing is on)")


class Plain(Constraint):
    name = "plain_test"
    config_class = CapableConfig


@pytest.fixture
def capable(monkeypatch):
    registry.available_constraints()  # loaded, so the additions below are not overwritten
    for cls in (Capable, Plain):
        monkeypatch.setitem(registry.constraints._registry, cls.name, cls)
    Capable.seen = []
    return Capable


def _axolotl_config_class():
    """``SafeguardArgs`` merged into a config that keeps Axolotl's other keys, as Axolotl merges it."""
    from safeguard_plugin.integrations.axolotl.args import SafeguardArgs

    class Merged(SafeguardArgs):
        model_config = ConfigDict(extra="allow")

    return Merged


def test_axolotl_settings_follow_the_declared_capabilities(capable):
    Merged = _axolotl_config_class()
    on = {k: True for k in KERNELS}
    cfg = Merged.model_validate({"safeguard": {"capable_test": {}}, "adapter": "lora", **on})
    assert [getattr(cfg, k) for k in KERNELS] == [False] * 3  # requires_unfused_lora: switched off
    setup = capable.seen[-1]
    assert setup == TrainingSetup(adapter="lora", packing=False, framework="axolotl")
    with pytest.raises(ValidationError, match=r"safeguard\.capable_test: needs `adapter: lora`"):
        Merged.model_validate({"safeguard": {"capable_test": {}}})  # requires_lora_adapter
    with pytest.raises(ValidationError, match="capable_test: needs one example per row"):
        Merged.model_validate({"safeguard": {"capable_test": {}}, "adapter": "qlora", "sample_packing": True})
    # a constraint that declares nothing: Axolotl's settings are left alone
    cfg = Merged.model_validate({"safeguard": {"plain_test": {}}, **on})
    assert [getattr(cfg, k) for k in KERNELS] == [True] * 3


def test_axolotl_kernel_message_names_the_constraints_and_keys(capable):
    from safeguard_plugin.integrations.axolotl.args import constraints_with, kernels_message

    block = {"capable_test": {}, "plain_test": {}}
    assert constraints_with(block, "requires_unfused_lora") == ["capable_test"]
    assert constraints_with(block, "calibrates_base_layers") == []
    msg = kernels_message(["lora_o_kernel"], ["capable_test"])
    assert msg.startswith("safeguard.capable_test: Axolotl's fused LoRA kernels (lora_o_kernel)")
    assert "`lora_o_kernel: false`" in msg


def test_builtin_capabilities_declared():
    """What the integrations used to hard-code per method is now declared by the method."""
    classes = registry.available_constraints()
    assert classes["guardspace"].requires_lora_adapter and classes["guardspace"].requires_unfused_lora
    assert classes["guardspace"].owns_model_save and classes["guardspace"].calibrates_base_layers
    assert classes["cwac"].calibrates_base_layers
    for name in ("procon", "monitor", "adaptive_kl", "cwac", "anchor"):
        assert not classes[name].requires_unfused_lora and not classes[name].requires_lora_adapter, name
    with pytest.raises(ConfigError, match="one example per row"):
        classes["adaptive_kl"].check_training(classes["adaptive_kl"].config_class(),
                                              TrainingSetup(adapter="lora", packing=True, framework="trl"))


def test_trl_bind_runs_check_training_before_model_surgery(capable, tok):
    from safeguard_plugin.integrations.trl import SafeguardCallback
    from safeguard_plugin.testing import tiny_model

    trainer = SimpleNamespace(model=tiny_model(), args=SimpleNamespace(packing=False, padding_free=True),
                              processing_class=tok)
    cb = SafeguardCallback({"capable_test": {}})
    with pytest.raises(ConfigError, match="one example per row"):
        cb.bind(trainer)
    assert capable.seen[-1] == TrainingSetup(adapter=None, packing=True, framework="trl")
    assert cb.engine.model is None  # refused before the engine touched the model


# ---------------------------------------------------------------------------- SafeguardCallback(trainer=...)
def _sft(tok, rows, out, callbacks=()):
    from datasets import Dataset
    from trl import SFTTrainer

    from safeguard_plugin.testing import tiny_model

    from helpers import sft_args

    torch.manual_seed(0)
    return SFTTrainer(model=tiny_model(), args=sft_args(out), train_dataset=Dataset.from_list(rows),
                      processing_class=tok, callbacks=list(callbacks))


def test_callback_takes_the_trainer_explicitly(artifact_dir, tok, chat_rows, tmp_path, monkeypatch):
    """``SafeguardCallback(config, trainer=trainer)`` binds to that trainer at once, without walking the call stack,
    and trains exactly like ``callbacks=[SafeguardCallback(config)]`` (which finds its trainer on the stack)."""
    from safeguard_plugin.integrations import trl as trl_integration
    from safeguard_plugin.integrations.trl import SafeguardCallback

    from helpers import max_diff

    cfg = {"artifact": str(artifact_dir), "procon": {"weight": 100.0, "warmup_ratio": 0.0}}
    ref = _sft(tok, chat_rows, tmp_path / "stack", [SafeguardCallback(cfg)])
    ref.train()

    def no_stack_walk(*_a, **_k):
        raise AssertionError("the trainer was looked up on the call stack")

    monkeypatch.setattr(trl_integration, "_find_trainer", no_stack_walk)
    tr = _sft(tok, chat_rows, tmp_path / "explicit")
    cb = SafeguardCallback(cfg, trainer=tr)
    assert cb.trainer is tr and cb.engine.model is tr.model  # bound now, before the optimizer exists
    tr.add_callback(cb)
    tr.train()
    state = lambda t: {k: v.detach().clone() for k, v in t.model.state_dict().items()}  # noqa: E731
    assert max_diff(state(ref), state(tr)) < 1e-6
    pen = [h["safeguard/procon_loss"] for h in tr.state.log_history if "loss" in h]
    assert len(pen) == 4 and pen == pytest.approx([h["safeguard/procon_loss"] for h in ref.state.log_history
                                                   if "loss" in h], rel=1e-5, abs=1e-9)


def test_bind_is_public(artifact_dir, tok, chat_rows, tmp_path):
    from safeguard_plugin.integrations.trl import SafeguardCallback

    assert not hasattr(SafeguardCallback, "_bind")
    tr = _sft(tok, chat_rows, tmp_path)
    cb = SafeguardCallback({"artifact": str(artifact_dir), "procon": {}})
    cb.bind(tr)  # model and tokenizer default to the trainer's
    assert cb.trainer is tr and cb.engine.model is tr.model and cb.engine.tokenizer is tok
    assert cb._log_wrapped and cb._save_wrapped_for is tr
    cb.bind(tr)  # binding the model already bound again is a no-op for the engine
    assert cb.engine.model is tr.model
