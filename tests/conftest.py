import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

# tests/plugins holds third-party-style constraint packages with their entry points (dist-info), e.g. the example
# constraint of docs/adding-a-constraint.md: on sys.path before anything loads the registry, so every test that
# iterates the registry covers them
PLUGINS = Path(__file__).with_name("plugins")
sys.path.insert(0, str(PLUGINS))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=UserWarning, module="peft")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tok():
    from safeguard_plugin.testing import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session")
def artifact_dir(tmp_path_factory, tok):
    """An artifact for ``tiny_model()`` (seed 0) calibrated for every registered constraint."""
    from safeguard_plugin.calibration import calibrate
    from safeguard_plugin.data import load_prompts
    from safeguard_plugin.testing import tiny_model

    out = tmp_path_factory.mktemp("art") / "tiny"
    calibrate(tiny_model(), tok, load_prompts("harmful", limit=64), load_prompts("harmless", limit=64), out,
              model_id="tiny", constraints="all", progress=False)
    return out


@pytest.fixture(scope="session")
def chat_rows():
    return [{"prompt": [{"role": "user", "content": f"What is {a} plus {b}?"}],
             "completion": [{"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}
            for a in range(8) for b in range(4)]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty asset/data cache (``SAFEGUARD_CACHE``) for this test."""
    root = tmp_path / "cache"
    monkeypatch.setenv("SAFEGUARD_CACHE", str(root))
    return root


@pytest.fixture(scope="module")
def single_thread():
    """Tiny matrices gain nothing from threads, and on a shared CPU OpenMP barriers slow them 10-30x
    (``pytestmark = pytest.mark.usefixtures("single_thread")`` in a module)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def harmful():
    """Eight harmful prompts (train split) for small calibrations."""
    from safeguard_plugin.data import load_prompts

    return load_prompts("harmful").train[:8]
