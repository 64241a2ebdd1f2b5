#!/bin/bash
# First run after a fresh install, per format (#29): install TREE with pip into a target folder (extension built,
# bytecode compiled, as pip leaves them), then per format drop the page cache (root), read CHECKPOINT back in and
# time three runs on CORES with --workers 2. Prints "format: run1 run2 run3" (wall s). Never run in CI.
#   bench/first_run.sh TREE CHECKPOINT [CORES] [SCRATCH]
set -euo pipefail
tree=$1 checkpoint=$2 cores=${3:-0,1} scratch=${4:-/tmp/fp8conv-first-run}
rm -rf "$scratch" && mkdir -p "$scratch"
python3 -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation --target "$scratch/site" "$tree"
cd "$scratch"
for fmt in fp8_e4m3 int4 nvfp4 mxfp4 mxfp8; do
  sync; echo 3 > /proc/sys/vm/drop_caches
  cat "$checkpoint"/*.safetensors > /dev/null
  line="$fmt:"
  for _ in 1 2 3; do
    /usr/bin/time -o "$scratch/t" -f "%e" env PYTHONPATH="$scratch/site" taskset -c "$cores" python3 -m fp8conv \
      quantize "$checkpoint" -o "$scratch/out" --overwrite -q --no-card --format "$fmt" --workers 2 > /dev/null
    line="$line $(tail -1 "$scratch/t")"
  done
  echo "$line"
done
