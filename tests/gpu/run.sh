#!/usr/bin/env bash
# The GPU suite in one command, for a CUDA machine with vLLM and this project installed:
#   bash tests/gpu/run.sh [OUTDIR]
# Writes OUTDIR/gpu-junit.xml and OUTDIR/gpu-pytest.log (default OUTDIR: .bench/gpu).
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${1:-.bench/gpu}
export PF_TEST_SERVER_TIMEOUT=${PF_TEST_SERVER_TIMEOUT:-600}  # a fresh GPU machine compiles kernels
mkdir -p "$out"
python3 -m pytest tests/gpu -v -rA -p no:cacheprovider --junitxml="$out/gpu-junit.xml" 2>&1 \
  | tee "$out/gpu-pytest.log"
status=${PIPESTATUS[0]}
[ "$status" -eq 5 ] && { echo "no GPU test ran" >&2; exit 1; }
exit "$status"
