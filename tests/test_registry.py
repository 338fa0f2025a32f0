"""Third-party constraints register through the same entry-point group as the built-ins."""

import sys
import textwrap

import pytest
import torch

from safeguard_plugin import registry
from safeguard_plugin.errors import ConfigError


@pytest.fixture
def plugin_on_path(tmp_path, monkeypatch):
    pkg = tmp_path / "toy_safeguard_ext.py"
    pkg.write_text(textwrap.dedent('''
        import torch
        from pydantic import Field
        from safeguard_plugin import Constraint, ConstraintConfig

        class ToyConfig(ConstraintConfig):
            scale: float = Field(1.0, gt=0)

        class Toy(Constraint):
            """Penalise the squared mean activation of layer 0 at the post-instruction positions."""
            name = "toy"
            config_class = ToyConfig

            def layers(self):
                return [0]

            def penalty(self, batch):
                return self.config.scale * batch.acts[0].pow(2).mean()
    '''))
    dist = tmp_path / "toy_safeguard_ext-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-safeguard-ext\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[safeguard_plugin.constraints]\ntoy = toy_safeguard_ext:Toy\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.reload()
    yield
    monkeypatch.undo()
    sys.modules.pop("toy_safeguard_ext", None)
    registry.reload()


def test_builtins_come_from_entry_points():
    from safeguard_plugin.constraints.procon import ProCon

    assert registry.get_constraint("procon") is ProCon
    with pytest.raises(ConfigError, match="registered: .*procon"):
        registry.get_constraint("nope")


def test_third_party_constraint_via_entry_point(plugin_on_path, artifact_dir, tok, chat_rows, tmp_path):
    from safeguard_plugin.config import ConfigError, load_config

    from helpers import max_diff, train

    assert "toy" in registry.available_constraints()
    assert load_config({"toy": {"scale": 2}}).section("toy").scale == 2.0
    with pytest.raises(ConfigError, match=r"toy\.scale"):
        load_config({"toy": {"scale": 0}})
    # it trains: the artifact supplies the post-instruction positions, the toy penalty changes the weights
    _, plain = train("plain", chat_rows, tok, tmp_path / "p")
    tr, toy = train("callback", chat_rows, tok, tmp_path / "t", {"artifact": str(artifact_dir), "toy": {"scale": 50.0}})
    assert max_diff(plain, toy) > 1e-4
    assert all("safeguard/penalty" in h for h in tr.state.log_history if "loss" in h)
    assert torch.isfinite(torch.tensor(tr.state.log_history[0]["safeguard/penalty"]))


def test_register_constraint_rejects_non_constraints():
    class NotOne:
        name = "x"

    with pytest.raises(TypeError, match="Constraint subclass"):
        registry.register_constraint(NotOne)


def test_broken_third_party_entry_point_is_reported_not_silent(tmp_path, monkeypatch):
    from safeguard_plugin.config import ConfigError, load_config

    dist = tmp_path / "broken_ext-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-ext\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[safeguard_plugin.constraints]\nbroken = no_such_module_xyz:Thing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        registry.reload()
        assert "procon" in registry.available_constraints()  # one broken plugin does not take the others down
        with pytest.raises(ImportError, match="failed to import: no_such_module_xyz"):
            registry.get_constraint("broken")
        with pytest.raises(ConfigError, match="'broken' is installed but failed to import"):
            load_config({"broken": {}})
    finally:
        monkeypatch.undo()
        registry.reload()
