#!/usr/bin/env bash
# The prepared GPU check (≤ 8 minutes on one H100/H200; details in docs/gpu-check.md and scripts/gpu_check.py).
#
#   bash scripts/gpu_wheels.sh                          # here, once: the missing packages into .whl/
#   bash scripts/gpu_check.sh                           # on the GPU machine (carry .whl); no network needed
#   PYTHON=.venv/bin/python bash scripts/gpu_check.sh --cpu-dry-run    # here: tiny model, 2 steps, no install
#
# Installs the carried packages the machine lacks into $GPU_CHECK_SITE (default /tmp/gpu-check-site; pip
# --no-index --no-deps --target), makes this
# checkout importable from PYTHONPATH (with its entry points), then runs the driver under one deadline
# (GPU_CHECK_BUDGET_S, default 470 s, install included). Arguments go to scripts/gpu_check.py. The table and a JSON
# record land in $OUT when set (the GPU tool copies it back), else in results/gpu-check/.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# outside the checkout: what is installed must not travel back with .whl/ on the next call (64 MiB)
SITE=${GPU_CHECK_SITE:-/tmp/gpu-check-site}
BUDGET=${GPU_CHECK_BUDGET_S:-470}
start=$(date +%s)
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 TQDM_DISABLE=1
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
OUTDIR=${OUT:-results/gpu-check}
mkdir -p "$OUTDIR" "$SITE"

install=1
for a in "$@"; do [ "$a" == --cpu-dry-run ] && install=0; done
[ "${GPU_CHECK_INSTALL:-}" == 1 ] && install=1
if [ $install == 1 ]; then
  if [ -d .whl ]; then
    mapfile -t files < <("$PY" scripts/gpu_check.py --plan-install .whl)
    wheels=() sdists=()
    for f in "${files[@]}"; do
      case $f in *.whl) wheels+=("$f") ;; *.tar.gz) sdists+=("$f") ;; esac
    done
    if [ ${#wheels[@]} -gt 0 ]; then
      echo "installing ${#wheels[@]} carried wheel(s) into $SITE"
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}" \
        || echo "WARNING: installing the carried wheels failed; the variants that need them will say so"
    fi
    for f in "${sdists[@]}"; do
      echo "building $f (DS_BUILD_OPS=0)"
      DS_BUILD_OPS=0 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target "$SITE" "$f" \
        || echo "WARNING: building $f failed"
    done
  else
    echo "no .whl/ here (run scripts/gpu_wheels.sh and carry .whl): nothing installed"
  fi
fi
"$PY" scripts/gpu_check.py --write-metadata "$SITE"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

left=$(( BUDGET - ($(date +%s) - start) ))
[ $left -gt 30 ] || { echo "no time left after the install ($left s)"; exit 1; }
# the driver stops starting variants at its deadline; the timeout is a backstop for a hung one
timeout --kill-after 15 $(( left + 10 )) "$PY" scripts/gpu_check.py --budget-s $(( left - 15 )) "$@" 2>&1 \
  | tee "$OUTDIR/gpu_check.log"
rc=${PIPESTATUS[0]}
[ $rc == 124 ] && echo "gpu_check.py was stopped by the backstop timeout; $OUTDIR/gpu_check.md holds the rows done"
exit $rc
