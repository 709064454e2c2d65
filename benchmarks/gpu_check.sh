#!/usr/bin/env bash
# Everything the training kernels need checked on one GPU:
#   tests     the GPU tests of tests/test_kernels.py and tests/test_kernels_backward.py (-v, --durations=10);
#   sanitize  compute-sanitizer memcheck, then racecheck, over the bfloat16 backward GPU tests
#             (TTT-Linear under both schedules, TTT-MLP);
#   bench     python3 -m benchmarks.bench_backward, its JSON written into OUT_DIR.
#   GIT_COMMIT=<sha> bash benchmarks/gpu_check.sh OUT_DIR [tests] [sanitize] [bench]   # default: all three
# tests and sanitize take about 6 minutes on an H200, bench about 6 more: under a 10-minute limit
# per command, run them as two commands. Each step has its own time limit, so a hang is reported
# and the next step still runs; the exit status is that of the first step that failed.
# Log: OUT_DIR/gpu_check.log (everything printed).
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR [tests] [sanitize] [bench]}
shift
steps=" ${*:-tests sanitize bench} "
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
# the unit tests make deprecation warnings errors for CI's pinned packages; the GPU image has its own
warn=(-W default::DeprecationWarning -W default::FutureWarning)
pytest=(python3 -m pytest -p no:cacheprovider "${warn[@]}")
if [[ $steps == *" tests "* ]]; then
    section "kernel tests on the GPU"
    run 220 "${pytest[@]}" -v --durations=10 tests/test_kernels.py tests/test_kernels_backward.py
fi
if [[ $steps == *" sanitize "* ]]; then
    for tool in memcheck racecheck; do
        section "compute-sanitizer $tool: bfloat16 backward GPU tests"
        run 150 compute-sanitizer --tool "$tool" --error-exitcode 1 \
            "${pytest[@]}" -v tests/test_kernels_backward.py -k "gpu_gradients and bfloat16"
    done
fi
if [[ $steps == *" bench "* ]]; then
    section "benchmarks.bench_backward -> $out/backward.json"
    run 560 python3 -m benchmarks.bench_backward --out "$out/backward.json"
fi
section "done: exit status $status"
exit "$status"
