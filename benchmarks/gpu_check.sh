#!/usr/bin/env bash
# Everything the training kernels need checked on one GPU, in one command (under 9.5 minutes on an H200):
#   1. the GPU tests of tests/test_kernels.py and tests/test_kernels_backward.py (--durations=10);
#   2. compute-sanitizer memcheck, then racecheck, over the backward GPU tests;
#   3. benchmarks/bench_backward.py, its JSON written into OUT_DIR.
#   GIT_COMMIT=<sha> bash benchmarks/gpu_check.sh OUT_DIR
# Each step has its own time limit, so a hang is reported and the next step still runs; the exit
# status is that of the first step that failed. Logs: OUT_DIR/gpu_check.log (everything printed).
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$out"
export GIT_COMMIT=${GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
status=0
section() { echo; echo "======== $* ($(date -u +%T))"; }
run() {  # run LIMIT_S CMD...: the command under a time limit, its status remembered
    local limit=$1; shift
    timeout --signal=KILL "$limit" "$@"
    local rc=$?
    [ "$rc" -eq 137 ] && echo "!!!!!!!! timed out after ${limit} s: $*"
    echo "-------- exit status $rc"
    [ "$status" -eq 0 ] && status=$rc
    return 0
}
exec > >(tee "$out/gpu_check.log") 2>&1
section "GPU: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1), commit $GIT_COMMIT"
section "1. kernel tests on the GPU"
# the unit tests make deprecation warnings errors for CI's pinned packages; the GPU image has its own
warn=(-W default::DeprecationWarning -W default::FutureWarning)
run 80 python3 -m pytest -q -p no:cacheprovider "${warn[@]}" --durations=10 tests/test_kernels.py tests/test_kernels_backward.py
section "2a. compute-sanitizer memcheck: backward GPU tests"
run 60 compute-sanitizer --tool memcheck --error-exitcode 1 \
    python3 -m pytest -q -p no:cacheprovider "${warn[@]}" tests/test_kernels_backward.py -k gpu
section "2b. compute-sanitizer racecheck: backward GPU tests"
run 60 compute-sanitizer --tool racecheck --error-exitcode 1 \
    python3 -m pytest -q -p no:cacheprovider "${warn[@]}" tests/test_kernels_backward.py -k gpu
section "3. bench_backward.py -> $out/backward.json"
run 300 python3 benchmarks/bench_backward.py --out "$out/backward.json"
section "done: exit status $status"
exit "$status"
