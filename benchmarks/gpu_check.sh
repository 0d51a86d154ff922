#!/usr/bin/env bash
# The GPU check in one command (see benchmarks/gpu_check.py): numerical tests on the device,
# the copy bandwidth, the op and model benchmarks, one results JSON. Under 8 minutes on one GPU.
#   bash benchmarks/gpu_check.sh [--dry-run] [--out FILE]
#   PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh --dry-run
# PYTHON names the interpreter that has jax, flax and pytest (default: python3 from PATH).
# Wheels that the machine lacks may travel in .whl/ at the repository root; they are installed
# into a folder of their own first (no network needed).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PYTHON" -m pip install -q --no-index --no-deps --target /tmp/bnjax_site .whl/*.whl
  export PYTHONPATH="/tmp/bnjax_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export XLA_PYTHON_CLIENT_PREALLOCATE=false
for arg in "$@"; do
  if [ "$arg" = "--dry-run" ]; then export JAX_PLATFORMS=cpu; fi
done
exec timeout 470 "$PYTHON" -m benchmarks gpu_check "$@"
