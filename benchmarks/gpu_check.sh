#!/usr/bin/env bash
# The GPU check, from the repository root of a fresh GPU machine: installs what `make gpu-kit`
# packed (.gpu-kit/, carried as one path) without network, then runs benchmarks/gpu_check.py.
#
#   benchmarks/gpu_check.sh OUTDIR                                  # on the GPU machine
#   OSDIFF_GPU_CHECK_DEVICE=cpu benchmarks/gpu_check.sh OUTDIR      # the rehearsal on a CPU
#
# Environment: PYTHON (default python3), OSDIFF_GPU_KIT (default .gpu-kit), OSDIFF_ORIGINAL
# (a checkout of the original implementation; default .gpu-kit/OSDiff).
#
# Installing: a wheel of the kit is installed only if its package is missing (the CPU machines'
# .venv already has them); all with --no-deps, because the image has every other dependency
# and no index to resolve them from. The package itself is installed editable with
# --no-build-isolation --no-index --no-deps, which works offline with either build backend
# (setuptools, or scikit-build-core + nanobind, both in the image) and never asks for
# polygraphy / onnx-graphsurgeon, which the image lacks and the check does not import.
set -euo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
py=${PYTHON:-python3}
kit=${OSDIFF_GPU_KIT:-.gpu-kit}
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
cd "$(dirname "$0")/.."
mkdir -p "$out"

if [ -d "$kit/wheels" ]; then
  missing=()
  for whl in "$kit"/wheels/*.whl; do
    name=$(basename "$whl" | cut -d- -f1)
    "$py" -m pip show -q "$name" >/dev/null 2>&1 || missing+=("$whl")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${#missing[@]} wheel(s) from $kit/wheels" >&2
    "$py" -m pip install -q --no-index --no-deps --no-cache-dir "${missing[@]}"
  fi
fi
if ! "$py" -c "import osdiff.runtime.codec" >/dev/null 2>&1; then
  echo "installing the package (editable, offline)" >&2
  "$py" -m pip install -q --no-index --no-deps --no-build-isolation -e .
fi
exec "$py" benchmarks/gpu_check.py "$out"
