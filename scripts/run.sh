#!/usr/bin/env bash
# The main job. Until the trainer lands this builds and runs the GEMM benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install_dependencies.sh
build=${CTFORMER_BUILD_DIR:-build}
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DCTFORMER_ENABLE_CUDA=OFF >/dev/null
if [[ -d examples/train_gpt ]]; then
  cmake --build "$build" -j "$(nproc)" --target train_gpt
  exec "$build/examples/train_gpt" "$@"
else
  cmake --build "$build" -j "$(nproc)" --target bench_gemm
  exec "$build/bench/bench_gemm" "$@"
fi
