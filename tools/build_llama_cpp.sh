#!/bin/sh
# Builds llama.cpp's llama-bench, llama-batched-bench, llama-quantize and llama-simple (CPU,
# -march=native) into DIR/build/bin, for tools/compare_llama_cpp.py and tools/check_gguf_llama_cpp.sh. The source is the copy of
# llama.cpp vendored in the llama-cpp-python source package on PyPI (the one
# registry this project's machines reach); the version is pinned so that a
# figure in docs/ names the llama.cpp it came from.
#
#   tools/build_llama_cpp.sh [DIR]        (default /tmp/llama.cpp)
#
# About 15 minutes on two cores.
set -eu

dir=${1:-/tmp/llama.cpp}
version=0.3.36  # llama-cpp-python; vendors llama.cpp commit 0c1e570 (2026-10-01)

if [ ! -f "$dir/CMakeLists.txt" ]; then
  download=$(mktemp -d)
  pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$download"
  tar -xzf "$download/llama_cpp_python-$version.tar.gz" -C "$download"
  mkdir -p "$(dirname "$dir")"
  mv "$download/llama_cpp_python-$version/vendor/llama.cpp" "$dir"
  rm -rf "$download"
fi

cmake -S "$dir" -B "$dir/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
  -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_SERVER=OFF
cmake --build "$dir/build" -j "$(nproc)" --target llama-bench llama-batched-bench llama-quantize llama-simple
echo "built: $(cd "$dir/build/bin" && echo "$PWD"/llama-bench "$PWD"/llama-batched-bench "$PWD"/llama-quantize "$PWD"/llama-simple)"
