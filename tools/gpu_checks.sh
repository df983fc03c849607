#!/usr/bin/env bash
# Everything a machine with an NVIDIA GPU checks, in one pass over a CUDA build
# (scripts/test.sh's build-cuda, or its programs copied elsewhere): every CUDA
# test program, compute-sanitizer memcheck on the inference and model tests,
# the inference benchmark alternating with its PyTorch peer
# (tools/compare_cuda_decode.py), and the training step. Logs go to OUT_DIR.
# Usage: tools/gpu_checks.sh <folder holding tests/*_cuda and bench_*_cuda> <OUT_DIR>
set -uo pipefail
programs=$1 out=$2
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
bench() { local b; b=$(ls "$programs"/bench/$1 "$programs"/$1 2>/dev/null | head -1); echo "${b:-$programs/$1}"; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
for t in "$programs"/tests/*_cuda; do
  name=$(basename "$t") start=$SECONDS
  timeout 300 "$t" > "$out/log_$name.txt" 2>&1
  rc=$?
  echo "$name: exit $rc, $((SECONDS - start)) s, $(tail -2 "$out/log_$name.txt" | tr '\n' ' ')"
  [[ $rc == 0 ]] && rm "$out/log_$name.txt"
done 2>&1 | tee "$out/tests.txt"
"$(bench bench_batched_decode_cuda)" --benchmark_counters_tabular=true 2>&1 | tee "$out/decode.txt"
PYTHONUNBUFFERED=1 timeout 300 python3 "$here/compare_cuda_decode.py" 2>&1 | tee -a "$out/decode.txt"
"$(bench bench_batched_decode_cuda)" --benchmark_filter=decode --benchmark_counters_tabular=true 2>&1 | tee -a "$out/decode.txt"
timeout 200 "$(bench bench_train_step_cuda)" --benchmark_counters_tabular=true 2>&1 | tee "$out/train.txt"
for t in infer_test_inference_cuda_cuda nn_test_model_cuda_matches_cpu_cuda; do
  timeout 300 compute-sanitizer --tool memcheck --leak-check full "$programs/tests/$t" 2>&1 | tail -15
done 2>&1 | tee "$out/memcheck.txt"
