"""Issue 15, item 8: one SafeguardError base for every user-facing error; no bare RuntimeError or assert for them."""

import ast
import pathlib

import safeguard_plugin
from safeguard_plugin.artifacts import ArtifactError
from safeguard_plugin.bench.assets import AssetError
from safeguard_plugin.config import ConfigError
from safeguard_plugin.constraints.cwac import CWACError
from safeguard_plugin.constraints.guardspace import GuardSpaceError
from safeguard_plugin.engine import SafeguardRuntimeError
from safeguard_plugin.errors import DataError, SafeguardError
from safeguard_plugin.example_data import ExampleDataError

PACKAGE = pathlib.Path(safeguard_plugin.__file__).parent


def test_every_error_class_is_a_safeguard_error_and_keeps_its_builtin_base():
    for cls, builtin in ((ConfigError, ValueError), (DataError, ValueError), (ArtifactError, RuntimeError),
                         (SafeguardRuntimeError, RuntimeError), (CWACError, ValueError), (GuardSpaceError, ValueError),
                         (ExampleDataError, ValueError), (AssetError, RuntimeError)):
        assert issubclass(cls, SafeguardError) and issubclass(cls, builtin), cls


def test_no_bare_builtin_raise_or_assert_in_the_package():
    """Every raise of a built-in ValueError / RuntimeError / KeyError and every assert is a finding."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assert):
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} assert")
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and isinstance(node.exc.func, ast.Name) \
                    and node.exc.func.id in ("ValueError", "RuntimeError", "KeyError", "Exception"):
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} raise {node.exc.func.id}")
    assert not found, found
