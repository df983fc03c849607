#!/usr/bin/env bash
# The test suite: installs dependencies, builds and runs every CPU test in the
# native build, the kernel tests again in the portable (no SIMD flags) build,
# compiles the AVX-512 kernel tests (and runs them where the CPU has AVX-512),
# compiles and runs the kernel and inference-forward tests again in an AVX2
# build (the paths of CPUs without AVX-512), runs the bad-input and
# memory-managing tests under AddressSanitizer and UBSan,
# compiles every CUDA source for sm_80 and sm_90 (and runs the CUDA tests
# where a GPU is present), and builds examples/consumer against an installed
# ctformer.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install_dependencies.sh
jobs=${CTFORMER_JOBS:-$(nproc)}
export CCACHE_DIR=${CCACHE_DIR:-$HOME/.cache/ccache}
# Paths inside the checkout hash relative to it, so a fresh clone elsewhere
# reuses the objects an earlier checkout compiled.
export CCACHE_BASEDIR=${CCACHE_BASEDIR:-$PWD}
export CCACHE_NOHASHDIR=${CCACHE_NOHASHDIR:-1}
build=${CTFORMER_BUILD_DIR:-build}

# Ninja builds the several targets of a stage in parallel (CMake's Makefiles
# build the targets named on one command line one after another). A build
# folder configured before keeps its generator.
configure() {
  local dir=$1; shift
  if [[ -f $dir/CMakeCache.txt ]]; then cmake -S . -B "$dir" "$@" >/dev/null
  else cmake -G Ninja -S . -B "$dir" "$@" >/dev/null; fi
}

echo "== Python for the server's end-to-end test and the GGUF check: a virtual environment with openai and gguf (PyPI)"
python_env=$build-python
[[ $python_env = /* ]] || python_env=$PWD/$python_env
if ! "$python_env/bin/python" -c "import openai, gguf" 2>/dev/null; then
  [[ -x $python_env/bin/pip ]] || python3 -m venv "$python_env"
  "$python_env/bin/pip" install --quiet --disable-pip-version-check openai gguf
fi

echo "== native build: every test"
configure "$build" -DCMAKE_BUILD_TYPE=Release -DCTFORMER_ARCH=native -DCTFORMER_ENABLE_CUDA=OFF \
  -DCTFORMER_PYTHON="$python_env/bin/python"
cmake --build "$build" -j "$jobs"
ctest --test-dir "$build" --output-on-failure -j "$jobs" -L cpu

echo "== portable build: kernel tests without SIMD flags"
configure "$build-portable" -DCMAKE_BUILD_TYPE=Release -DCTFORMER_ARCH=portable -DCTFORMER_ENABLE_CUDA=OFF \
  -DCTFORMER_BUILD_BENCHMARKS=OFF -DCTFORMER_BUILD_EXAMPLES=OFF
portable_targets=$(cd tests/unit && ls core/test_*.cpp ops/test_*.cpp quant/test_*.cpp 2>/dev/null | sed -E 's#^([a-z_]+)/(test_[a-z0-9_]+)\.cpp$#\1_\2#')
cmake --build "$build-portable" -j "$jobs" --target $portable_targets
ctest --test-dir "$build-portable" --output-on-failure -j "$jobs" -L 'core|ops|quant' -R "$(echo $portable_targets | tr ' ' '|')"

echo "== AVX-512 build: kernel tests"
configure "$build-avx512" -DCMAKE_BUILD_TYPE=Release -DCTFORMER_ARCH=avx512 -DCTFORMER_ENABLE_CUDA=OFF \
  -DCTFORMER_BUILD_BENCHMARKS=OFF -DCTFORMER_BUILD_EXAMPLES=OFF
cmake --build "$build-avx512" -j "$jobs" --target $portable_targets
if grep -q -w avx512f /proc/cpuinfo && grep -q -w avx512_bf16 /proc/cpuinfo; then
  ctest --test-dir "$build-avx512" --output-on-failure -j "$jobs" -R "$(echo $portable_targets | tr ' ' '|')"
else
  echo "   this CPU has no AVX-512 (BF16): the AVX-512 tests were compiled, not run"
fi

echo "== AVX2 build: kernel and inference tests (the code paths of CPUs without AVX-512)"
configure "$build-avx2" -DCMAKE_BUILD_TYPE=Release -DCTFORMER_ARCH=avx2 -DCTFORMER_ENABLE_CUDA=OFF \
  -DCTFORMER_BUILD_BENCHMARKS=OFF -DCTFORMER_BUILD_EXAMPLES=OFF
# The inference tests whose forward runs the SIMD kernels (GEMM, quantized
# GEMV, attention); the engine, sampler and metrics tests hold no ISA code.
avx2_targets="$portable_targets infer_test_inference_model infer_test_batch infer_test_generate infer_test_kv_write infer_test_sliding_window"
cmake --build "$build-avx2" -j "$jobs" --target $avx2_targets
if grep -q -w avx2 /proc/cpuinfo && grep -q -w fma /proc/cpuinfo; then
  ctest --test-dir "$build-avx2" --output-on-failure -j "$jobs" -R "^($(echo $avx2_targets | tr ' ' '|'))$"
else
  echo "   this CPU has no AVX2: the AVX2 tests were compiled, not run"
fi

echo "== AddressSanitizer + UBSan: the tests that feed bad input or manage memory by hand"
# -O1 -g1 halves the instrumented compile against -O2 -g and keeps line numbers
# in the reports; assertions stay on.
configure "$build-sanitize" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g1" \
  -DCTFORMER_ARCH=native -DCTFORMER_SANITIZE=ON \
  -DCTFORMER_ENABLE_CUDA=OFF -DCTFORMER_BUILD_BENCHMARKS=OFF -DCTFORMER_BUILD_EXAMPLES=OFF
sanitize_targets="$(cd tests/unit && ls io/test_*.cpp serve/test_*.cpp 2>/dev/null | sed -E 's#^([a-z_]+)/(test_[a-z0-9_]+)\.cpp$#\1_\2#')
  quant_test_formats compress_test_post_training_quantization train_test_resume
  infer_test_engine infer_test_batch infer_test_kv_cache"
cmake --build "$build-sanitize" -j "$jobs" --target $sanitize_targets
ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
  ctest --test-dir "$build-sanitize" --output-on-failure -j "$jobs" -R "^($(echo $sanitize_targets | tr ' ' '|'))$"

if command -v nvcc >/dev/null; then
  echo "== CUDA build: every .cu for sm_80 and sm_90"
  configure "$build-cuda" -DCMAKE_BUILD_TYPE=Release -DCTFORMER_ENABLE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="80;90" \
    -DCTFORMER_BUILD_EXAMPLES=OFF
  # Only the CUDA programs: the CPU tests were built and run above.
  cuda_targets="$(cd tests/unit && ls */test_*.cu | sed -E 's#^([a-z_]+)/(test_[a-z0-9_]+)\.cu$#\1_\2_cuda#')
    $(cd bench && ls */bench_*.cu | sed -E 's#^[a-z_]+/(bench_[a-z0-9_]+)\.cu$#\1#')"
  cmake --build "$build-cuda" -j "$jobs" --target $cuda_targets
  if nvidia-smi -L >/dev/null 2>&1; then
    ctest --test-dir "$build-cuda" --output-on-failure -L cuda
  else
    echo "   no GPU here: the CUDA tests were compiled, not run"
  fi
fi

echo "== consumer project against an installed ctformer"
prefix=$(mktemp -d)
trap 'rm -rf "$prefix"' EXIT
cmake --install "$build" --prefix "$prefix" >/dev/null
cmake -S examples/consumer -B "$build-consumer" -DCMAKE_PREFIX_PATH="$prefix" >/dev/null
cmake --build "$build-consumer" -j "$jobs"
"$build-consumer/consumer"
echo "== all tests passed"
