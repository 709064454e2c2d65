#!/usr/bin/env bash
# Every result of chapter 6's comparison with a Llama, in one command on one CUDA GPU (about
# 30 minutes on an H200):
#   bash benchmarks/reproduce_inference.sh CORPUS NEW_MODEL_FOLDER
# CORPUS: a corpus folder (`python -m ttt_helpers.data build-corpus CORPUS`); NEW_MODEL_FOLDER:
# a folder that does not exist yet, for the retrained 125M TTT-Linear (M). Writes, with <gpu> the
# GPU's model (h200 for an NVIDIA H200):
#   1. results/kernels_<gpu>.json: every section of benchmarks.bench_kernels (kernels, step, models);
#   2. results/long_context_rerun_<gpu>.json: the long-context TTT-Linear (M) of chapter 5,
#      retrained with its command and saved to NEW_MODEL_FOLDER;
#   3. results/model_distances_125m_<gpu>.json: that model's kernel path against its reference
#      path in fp16 and bf16, B = 32, 512 prefill and 512 decode steps.
set -euo pipefail
usage="usage: bash benchmarks/reproduce_inference.sh CORPUS NEW_MODEL_FOLDER"
if [[ $# -ne 2 ]]; then
    echo "$usage" >&2
    exit 2
fi
corpus=$1
model=$2
if [[ ! -f $corpus/manifest.json ]]; then
    echo "CORPUS must be a corpus folder with manifest.json (python -m ttt_helpers.data build-corpus), got '$corpus'" >&2
    exit 2
fi
if [[ -e $model ]]; then
    echo "NEW_MODEL_FOLDER '$model' exists: give a new folder, a saved model is never overwritten" >&2
    exit 2
fi
if ! gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1) || [[ -z $gpu ]]; then
    echo "reproduce_inference.sh needs a CUDA GPU (nvidia-smi found none); python3 -m benchmarks.bench_kernels --dry-run runs on the CPU" >&2
    exit 2
fi
tag=$(sed -E 's/^NVIDIA //' <<<"$gpu" | awk '{print tolower($1)}')
corpus=$(realpath "$corpus")
model=$(realpath -m "$model")
cd "$(dirname "$0")/.."  # the scripts run as modules of the package benchmarks, from the repository root
results=$PWD/benchmarks/results
echo "== 1/3 bench_kernels on $gpu"
python3 -m benchmarks.bench_kernels --out "$results/kernels_$tag.json"
echo "== 2/3 train_long: the 125M TTT-Linear (M), saved to $model"
python3 -m benchmarks.train_long --corpus "$corpus" --model ttt-linear-m --context 8192 --tokens 35913728 \
    --batch 8 --step-tokens 262144 --lr 2e-3 --eval-windows 2 --decode-lengths 2048 \
    --save-model "$model" --out "$results/long_context_rerun_$tag.json"
echo "== 3/3 model_distances on the saved model"
python3 -m benchmarks.model_distances --checkpoint "$model" --corpus "$corpus" \
    --out "$results/model_distances_125m_$tag.json"
