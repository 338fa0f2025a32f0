#!/usr/bin/env bash
# Axolotl test environment: its own venv, because Axolotl pins older transformers/TRL/PEFT than our main one.
#
#   scripts/axolotl_env.sh                 # creates/updates .venv-axolotl (idempotent; a no-op when complete)
#   . .venv-axolotl/bin/activate           # needed for `axolotl train` (it starts `accelerate` from PATH)
#   .venv-axolotl/bin/python -m pytest tests/test_axolotl.py -q -p no:cacheprovider
#
# Env: AXOLOTL_VENV (default .venv-axolotl), AXOLOTL_VERSION (default 0.19.0, the newest on PyPI that keeps the
# CPU torch 2.13.0 wheel), TORCH_VERSION (default 2.13.0). torch is installed first so that Axolotl's
# `torch<=2.13.0`-style pin is already satisfied and pip does not pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${AXOLOTL_VENV:-.venv-axolotl}"
AXOLOTL_VERSION="${AXOLOTL_VERSION:-0.19.0}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"

installed() {  # installed() <dist> <version>: is exactly that version installed?
    "$PY" - "$1" "$2" <<'PYEOF' 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(0 if version(sys.argv[1]).split("+")[0] == sys.argv[2] else 1)
PYEOF
}

installed torch "$TORCH_VERSION" || "$PY" -m pip install -q "torch==$TORCH_VERSION"
installed axolotl "$AXOLOTL_VERSION" || "$PY" -m pip install -q "axolotl==$AXOLOTL_VERSION" "torch==$TORCH_VERSION"
# DeepSpeed for the example_yamls/axolotl_deepspeed_*.yaml tests (1 process on CPU); Axolotl 0.19 accepts <0.19.
# DS_BUILD_OPS=0: no ops compiled at install (the first run compiles a small comm op, ~1 min, needs g++ and ninja)
"$PY" -c "import deepspeed" 2>/dev/null || DS_BUILD_OPS=0 "$PY" -m pip install -q "deepspeed>=0.18.6,<0.19.0" --no-build-isolation
# our package without its (newer) pins, plus whatever of its dependencies Axolotl did not bring
"$PY" -m pip install -q --no-deps -e .
"$PY" -m pip install -q "pydantic>=2.7" "pyyaml>=6.0" "safetensors>=0.4" "tqdm>=4.66" "gguf>=0.10" \
    "matplotlib>=3.8" "psutil>=5.9" "pytest>=8" "torch==$TORCH_VERSION"

# fail loudly if anything replaced the CPU torch or the package cannot be imported with Axolotl's pins
TORCH_VERSION="$TORCH_VERSION" "$PY" - <<'PYEOF'
import importlib.metadata as md
import os

import torch

assert torch.__version__.split("+")[0] == os.environ["TORCH_VERSION"], f"torch was replaced: {torch.__version__}"
from safeguard_plugin.integrations.axolotl import SafeguardPlugin  # imports Axolotl and our core with its pins
assert SafeguardPlugin().get_input_args().endswith("SafeguardArgs")
print("axolotl env ok:", ", ".join(f"{d} {md.version(d)}" for d in
      ("axolotl", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "pydantic", "deepspeed",
       "safeguard-plugin")))
PYEOF

# what to type next: `axolotl train` starts `accelerate` from PATH, so the venv must be activated (calling
# $VENV/bin/axolotl directly fails with "No such file or directory: b'/bin/accelerate'")
case "$VENV" in /*) ACTIVATE="$VENV/bin/activate" ;; *) ACTIVATE="$PWD/$VENV/bin/activate" ;; esac
cat <<EOF2

Axolotl environment ready. Activate it in every new shell (axolotl starts \`accelerate\` from PATH):

  . $ACTIVATE

then try the plugin on a tiny local model (from $PWD):

  safeguard example-data --out axolotl-example
  cd axolotl-example && HF_HUB_OFFLINE=1 WANDB_MODE=disabled axolotl train ../example_yamls/axolotl_lora_procon.yaml
EOF2
