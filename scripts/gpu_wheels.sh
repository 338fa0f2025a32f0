#!/usr/bin/env bash
# Download the packages the GPU machine lacks (scripts/gpu_wheels.txt) into .whl/ (git-ignored), for
# scripts/gpu_check.sh to install there with `pip install --no-index`. Run it here, where PyPI is reachable:
#
#   bash scripts/gpu_wheels.sh                     # all of the list
#   bash scripts/gpu_wheels.sh --no-bitsandbytes   # without the 43 MiB bitsandbytes wheel (QLoRA rows then skip)
#   bash scripts/gpu_wheels.sh --print             # only print what it would fetch (no network)
#
# Wheels are for the GPU machine's Python (GPU_PY, default 3.12) on manylinux x86_64. DeepSpeed has no wheel on
# PyPI: its source tarball is built here into a pure-Python wheel with DS_BUILD_OPS=0 (needs torch in $PYTHON;
# without it the tarball itself is kept and gpu_check.sh builds it there). Files of other versions are removed
# (two versions of one package stop the whole install). Ends with the total size against the 64 MiB that may
# travel with the working tree.
set -euo pipefail
shopt -s nullglob
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
GPU_PY=${GPU_PY:-3.12}
DEST=.whl
LIMIT_MIB=64
print_only=0 skip_bnb=0
for a in "$@"; do
  case $a in
    --print) print_only=1 ;;
    --no-bitsandbytes) skip_bnb=1 ;;
    *) echo "usage: $0 [--print] [--no-bitsandbytes]" >&2; exit 2 ;;
  esac
done

mapfile -t specs < <("$PY" scripts/gpu_check.py --wheel-specs)
[ ${#specs[@]} -gt 0 ] || { echo "no packages listed in scripts/gpu_wheels.txt" >&2; exit 1; }
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64 any; do platforms+=(--platform "$p"); done
download=("$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$GPU_PY" --implementation cp
          "${platforms[@]}" -d "$DEST")

mkdir -p "$DEST"
keep=()
for line in "${specs[@]}"; do
  read -r pin opts <<<"$line"
  name=${pin%%==*} version=${pin##*==}
  stem=$(echo "$name" | tr '.-' '__' | tr '[:upper:]' '[:lower:]')
  if [[ " $opts " == *" optional "* && $skip_bnb == 1 && $stem == bitsandbytes ]]; then
    echo "leaving out $pin (--no-bitsandbytes)"; continue
  fi
  keep+=("$stem-$version")
  if [[ " $opts " == *" build "* ]]; then
    cmd="DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps --no-build-isolation -w $DEST $pin"
  else
    cmd="${download[*]} $pin"
  fi
  if [ $print_only == 1 ]; then echo "$pin: $cmd"; continue; fi
  have=0
  for f in "$DEST"/*; do [[ ${f,,} == "$DEST/$stem-$version"[-.]* ]] && have=1; done
  if [ $have == 1 ]; then echo "have $pin"; continue; fi
  echo "fetching $pin"
  if [[ " $opts " == *" build "* ]]; then
    if ! DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "$pin"; then
      echo "  building $pin failed here; keeping its source tarball (built on the GPU machine)"
      "$PY" -m pip download -q --no-deps --no-binary=:all: -d "$DEST" "$pin"
    fi
  else
    "${download[@]}" "$pin"
  fi
done
[ $print_only == 1 ] && exit 0

# files of packages or versions not in the list
for f in "$DEST"/*.whl "$DEST"/*.tar.gz; do
  [ -e "$f" ] || continue
  base=$(basename "$f")
  stem=$(echo "$base" | sed -E 's/\.tar\.gz$//; s/\.whl$//' | awk -F- '{print $1"-"$2}' | tr '.-' '__' | tr '[:upper:]' '[:lower:]')
  ok=0
  for k in "${keep[@]}"; do
    [ "$(echo "$k" | tr '.-' '__')" == "$stem" ] && ok=1
  done
  if [ $ok == 0 ]; then echo "removing $base (not in the list)"; rm -f "$f"; fi
done

# all of .whl/ travels when carried, whatever else lies there
total=$(du -sb "$DEST" | cut -f1)
other=$(find "$DEST" -mindepth 1 -maxdepth 1 ! -name '*.whl' ! -name '*.tar.gz' | head -5)
[ -z "$other" ] || echo "WARNING: $DEST holds more than the packages (carried too): $other"
# what travels besides: tracked and untracked-not-ignored files (deleted ones are left out)
tree=$( { git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null || true; } | tail -1 | cut -f1)
echo
ls -l "$DEST" | grep -E '\.(whl|tar\.gz)$' | awk '{printf "  %8.2f MiB  %s\n", $5/1048576, $9}'
awk -v w="$total" -v t="$tree" -v l="$LIMIT_MIB" 'BEGIN {
  printf "wheels %.1f MiB + working tree %.1f MiB = %.1f MiB of the %d MiB that may travel\n", w/1048576, t/1048576, (w+t)/1048576, l
  exit ((w + t) > l * 1048576) }' || { echo "OVER the limit: rerun with --no-bitsandbytes" >&2; exit 1; }
