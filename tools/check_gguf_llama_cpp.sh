#!/usr/bin/env bash
# GGUF files written by ctformer, run by llama.cpp itself: a byte-level
# nanoGPT trained on tiny Shakespeare is written as F32 and Q8_0 GGUF by
# `quantize`; llama.cpp's `llama-simple` (greedy) continues a prompt from each
# file, and ctformer's `generate` (greedy) continues it from the same file:
# the F32 texts must be equal (Q8_0: see below). Then llama.cpp's
# `llama-quantize` turns the F32 file into Q8_0; its linear weights must
# have the bytes of ctformer's Q8_0 file. Not in CI: llama.cpp
# takes about 15 minutes to build on two cores.
#
#   tools/build_llama_cpp.sh          # builds llama-simple and llama-quantize among its tools
#   tools/check_gguf_llama_cpp.sh BUILD LLAMA_BIN PYTHON [WORK]
#
# BUILD: ctformer's build folder; LLAMA_BIN: llama.cpp's build/bin (llama-simple,
# llama-quantize); PYTHON: a Python with the gguf package.
set -euo pipefail
build=$1 llama=$2 python=$3 work=${4:-/tmp/ctformer_gguf_llama_cpp}
here=$(cd "$(dirname "$0")/.." && pwd)
rm -rf "$work" && mkdir -p "$work"

"$build/examples/train_gpt" --data "$here/data/tinyshakespeare.txt" --preset bytes --steps 1500 --eval-every 0 \
  --sample-tokens 0 --quiet --save "$work/m.safetensors" > /dev/null
"$build/examples/quantize" --in "$work/m.safetensors" --out "$work/m_f32.gguf" --format fp32 > /dev/null
"$build/examples/quantize" --in "$work/m.safetensors" --out "$work/m_q8_0.gguf" --format q8_0 > /dev/null
"$llama/llama-quantize" "$work/m_f32.gguf" "$work/m_llama_q8_0.gguf" Q8_0 > "$work/llama-quantize.log" 2>&1

prompt="ROMEO:"
tokens=64  # the prompt's 6 bytes and 58 new tokens
ours() {  # <gguf> -> prompt + greedy continuation
  "$build/examples/generate" --checkpoint "$1" --prompt "$prompt" --temperature 0 --max-tokens $((tokens - 6)) \
    --summary-json "$work/summary.json" > /dev/null
  "$python" -c 'import json, sys; print(sys.argv[2] + json.load(open(sys.argv[1]))["text"], end="")' \
    "$work/summary.json" "$prompt"
}
theirs() {  # <gguf> -> llama-simple's prompt + greedy continuation
  "$llama/llama-simple" -m "$1" -n $((tokens - 6)) "$prompt" 2> "$work/llama-simple.log"
}
status=0
# F32: the same floats in both engines, so the same text. Q8_0: the same
# blocks, but llama.cpp rounds each activation block's scale to fp16 where
# ctformer keeps it fp32, so a near-tie between two tokens can go either
# way: reported as the length of the common prefix, not failed.
for file in m_f32 m_q8_0 m_llama_q8_0; do
  a=$(ours "$work/$file.gguf") b=$(theirs "$work/$file.gguf")
  if [[ "$a" == "$b" ]]; then
    echo "$file.gguf: llama.cpp and ctformer give the same greedy text: $(printf %q "$a")"
  else
    common=0
    while [[ $common -lt ${#a} && "${a:$common:1}" == "${b:$common:1}" ]]; do common=$((common + 1)); done
    echo "$file.gguf: the greedy texts agree for $((common - ${#prompt})) of $((${#a} - ${#prompt})) new bytes"
    echo "  ctformer:  $(printf %q "$a")"
    echo "  llama.cpp: $(printf %q "$b")"
    [[ $file == m_f32 ]] && status=1
  fi
done
"$python" - "$work/m_q8_0.gguf" "$work/m_llama_q8_0.gguf" <<'PY' || status=1
import sys
import gguf
ours, theirs = (gguf.GGUFReader(p) for p in sys.argv[1:3])
mine = {t.name: t for t in ours.tensors}
same = differ = 0
for t in theirs.tensors:
    o = mine[t.name]
    if o.tensor_type != t.tensor_type:
        print(f"  {t.name}: ctformer wrote {o.tensor_type.name}, llama-quantize {t.tensor_type.name}")
        continue
    if bytes(o.data) == bytes(t.data):
        same += 1
    else:
        differ += 1
        print(f"  {t.name}: {t.tensor_type.name} bytes differ")
print(f"llama-quantize's Q8_0 against ctformer's: {same} tensors byte for byte equal, {differ} different")
sys.exit(1 if differ else 0)
PY
exit $status
