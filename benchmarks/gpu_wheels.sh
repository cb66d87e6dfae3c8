#!/usr/bin/env bash
# Run HERE, on a machine with network access, before a GPU session: the GPU machine downloads nothing.
# Its image (Python 3.12, CuPy 14, PyTorch, Numba, NumPy, SciPy, safetensors, ml-dtypes, tqdm, Hypothesis)
# lacks one of refattn's requirements, jsonschema (the manifest's schema), and three of jsonschema's own.
# This saves their wheels for that Python in .whl/ (ignored by git), where gpu_check.sh installs them from;
# carry .whl to the device machine with the working tree.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==0.30.0
ls .whl
