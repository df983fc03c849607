#!/usr/bin/env bash
# The main job: builds examples/train_gpt and runs it (no arguments: train on
# the embedded addition task, then answer held-out problems; see README).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install_dependencies.sh
build=${CTFORMER_BUILD_DIR:-build}
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DCTFORMER_ENABLE_CUDA=OFF >/dev/null
cmake --build "$build" -j "$(nproc)" --target train_gpt
exec "$build/examples/train_gpt" "$@"
