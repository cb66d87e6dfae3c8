#!/usr/bin/env bash
# The device check of the GPU path (issue 19), one run on one GPU, under 8 minutes:
# verify every cupy backend against the conformance vectors (float64 and float32, with gradients),
# then time each against PyTorch's CUDA SDPA and FlexAttention (B=1, H=8, D=64, N = 4K, 16K, 64K).
# Writes gpu_check.md and gpu_check.json to $OUT (or ./gpu_check_out). Downloads nothing: wheels that
# benchmarks/gpu_wheels.sh saved in .whl/ beforehand (carried with the tree) are installed from there.
# refattn runs from this checkout (PYTHONPATH), not from an installed copy.
# Arguments go to benchmarks/gpu_check.py (e.g. --dry-run, --sizes 4096, --mechanisms dense).
set -euo pipefail
cd "$(dirname "$0")/.."
export OUT="${OUT:-gpu_check_out}" PYTHONUNBUFFERED=1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/refattn-site .whl/*.whl
    export PYTHONPATH="/tmp/refattn-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 470 python3 benchmarks/gpu_check.py "$@"
