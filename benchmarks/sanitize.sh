#!/usr/bin/env bash
# The kernel tests under compute-sanitizer on one GPU: memcheck over the prefill and decode tests,
# racecheck over the same (shared-memory hazards), then every kernel test plainly.
#   bash benchmarks/sanitize.sh [OUT]      (default benchmarks/results/sanitizer_h100.txt)
set -uo pipefail
out=${1:-benchmarks/results/sanitizer_h100.txt}
commit=${GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
tests="(prefill or decode) and not graph and not model"
{
    echo "# compute-sanitizer on an $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), $(date -u +%F), commit $commit"
    echo "## memcheck: python3 -m pytest tests/test_kernels.py -k '$tests'"
    compute-sanitizer --tool memcheck python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "$tests" 2>&1
    echo "## racecheck: python3 -m pytest tests/test_kernels.py -k '$tests'"
    compute-sanitizer --tool racecheck python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "$tests" 2>&1
    echo "## all kernel tests on the GPU"
    python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1
} | grep -v '^$' >"$out"
cat "$out"
