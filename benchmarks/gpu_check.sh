#!/usr/bin/env bash
# The device check of the GPU path (issue 19), one run on one GPU, under 8 minutes:
# verify every cupy backend against the conformance vectors (float64 and float32, with gradients),
# then time each against PyTorch's CUDA SDPA (B=1, H=8, D=64, N = 4K, 16K, 64K).
# Writes gpu_check.md and gpu_check.json to $OUT (or ./gpu_check_out). Installs nothing.
# Arguments go to benchmarks/gpu_check.py (e.g. --dry-run, --sizes 4096, --mechanisms dense).
set -euo pipefail
cd "$(dirname "$0")/.."
export OUT="${OUT:-gpu_check_out}"
exec timeout 470 python benchmarks/gpu_check.py "$@"
