"""The constraint interface does not depend on the engine: constraints see ``Runtime`` / ``CalibrationContext`` from
``constraints/base.py``, and nothing on the constraint side imports ``safeguard_plugin.engine``."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "safeguard_plugin"
# the constraint side: the interface, the methods and what they build on (calibration, risk estimators, SAE, models,
# the run state). The engine and the integrations are the other side.
CONSTRAINT_SIDE = sorted([*PKG.joinpath("constraints").rglob("*.py"), PKG / "risk.py", PKG / "sae.py",
                          PKG / "calibration.py", PKG / "modeling.py", PKG / "state.py"])


def test_interface_imports_without_the_engine():
    """A fresh interpreter imports the interface, the calibration context and every registered constraint class
    without importing ``safeguard_plugin.engine`` (the config -> registry -> base -> engine cycle is gone)."""
    code = (
        "import sys\n"
        "import safeguard_plugin.constraints.base as base\n"
        "assert 'safeguard_plugin.engine' not in sys.modules, 'base imported the engine'\n"
        "from safeguard_plugin.calibration import CalibrationContext\n"
        "assert CalibrationContext is base.CalibrationContext\n"
        "from safeguard_plugin.registry import available_constraints\n"
        "classes = available_constraints()\n"
        "assert classes\n"
        "import safeguard_plugin.risk, safeguard_plugin.state\n"
        "bad = 'safeguard_plugin.engine' in sys.modules\n"
        "print('ENGINE' if bad else 'CLEAN', sorted(classes))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("CLEAN"), out.stdout


def _engine_uses(path: Path) -> list[str]:
    """Imports of the engine (top-level, lazy or under TYPE_CHECKING) and ``.engine`` attribute reads in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if mod.split(".")[-1] == "engine" or any(a.name == "engine" for a in node.names):
                found.append(f"{path.relative_to(PKG)}:{node.lineno}: from {'.' * node.level}{mod} import ...")
        elif isinstance(node, ast.Import):
            found += [f"{path.relative_to(PKG)}:{node.lineno}: import {a.name}" for a in node.names if a.name.endswith(".engine")]
        elif isinstance(node, ast.Attribute) and node.attr == "engine":
            found.append(f"{path.relative_to(PKG)}:{node.lineno}: .engine")
    return found


def test_constraint_side_never_reaches_for_the_engine():
    """Constraints use ``TrainContext.runtime`` / ``BatchView.runtime`` (the ``Runtime`` protocol), never the engine:
    no import of it anywhere on the constraint side (lazy and TYPE_CHECKING ones included), no ``ctx.engine``."""
    assert PKG / "constraints" / "base.py" in CONSTRAINT_SIDE
    found = [hit for path in CONSTRAINT_SIDE for hit in _engine_uses(path)]
    assert not found, "\n".join(found)


def test_engine_implements_the_runtime(artifact_dir, tok):
    from safeguard_plugin.constraints.base import CalibrationContext, Runtime, TrainContext
    from safeguard_plugin.engine import SafeguardEngine
    from safeguard_plugin.testing import tiny_model

    eng = SafeguardEngine({"artifact": str(artifact_dir), "procon": {}}).setup(tiny_model(), tok)
    assert isinstance(eng, Runtime)
    ctx = eng.context()
    assert isinstance(ctx, TrainContext) and ctx.runtime is eng and not hasattr(ctx, "engine")
    assert eng.post_instruction_ids and eng.world_size == 1 and eng.collective_forwards is False
    assert eng.tokenizer is tok and eng.reference_available()
    eng.request_stop("first alert")
    eng.request_stop("second alert")
    assert eng.stop_reason == "first alert; second alert"
    fields = CalibrationContext.__dataclass_fields__
    assert {"constraint_configs", "base_model", "cache"} <= set(fields)


def test_batch_reference_hidden_goes_through_the_runtime():
    """``BatchView.reference_hidden`` slices the batch (rows, length, the forward's 2-D kwargs) and asks the runtime for
    one forward per distinct request."""
    import torch

    from safeguard_plugin.constraints.base import BatchView

    calls = []

    class FakeRuntime:
        def reference_hidden(self, input_ids, **kwargs):
            calls.append((input_ids.clone(), {k: v.clone() for k, v in kwargs.items()}))
            return torch.zeros(*input_ids.shape, 3)

    ids = torch.arange(12).reshape(3, 4)
    mask = torch.ones(3, 4, dtype=torch.long)
    batch = BatchView(input_ids=ids, acts={}, valid=torch.ones(3, dtype=torch.bool),
                      forward_kwargs={"attention_mask": mask, "labels": ids}, runtime=FakeRuntime())
    h = batch.reference_hidden([0, 2], length=2)
    assert h.shape == (2, 2, 3) and len(calls) == 1
    assert calls[0][0].tolist() == [[0, 1], [8, 9]] and set(calls[0][1]) == {"attention_mask"}
    batch.reference_hidden(torch.tensor([0, 2]), length=2)
    assert len(calls) == 1  # cached per (rows, length)
    with pytest.raises(RuntimeError, match="no runtime attached"):
        BatchView(input_ids=ids, acts={}, valid=torch.ones(3, dtype=torch.bool)).reference_hidden()
