#!/usr/bin/env bash
# quantize writes GGUF that llama.cpp's own reader (the gguf package) finds
# in llama.cpp's layout with the blocks of the quantized checkpoint, and the
# tools run a GGUF file to the same greedy text as the checkpoint it came
# from (F32, Q8_0, Q4_0), F16 included; formats GGUF has no type for are refused.
# Usage: gguf_export.sh <train_gpt> <quantize> <generate> <python with gguf> <tools/> <scratch folder>
set -euo pipefail
train_gpt=$1 quantize=$2 generate=$3 python=$4 tools=$5 work=$6
rm -rf "$work" && mkdir -p "$work"
"$train_gpt" --steps 30 --eval-every 0 --threads 1 --quiet --batch-size 8 --save "$work/m.safetensors" > /dev/null

for format in q8_0 q4_0; do
  "$quantize" --in "$work/m.safetensors" --out "$work/m_$format.safetensors" --format $format > /dev/null
  "$quantize" --in "$work/m.safetensors" --out "$work/m_$format.gguf" --format $format > /dev/null
  "$python" "$tools/check_gguf_export.py" "$work/m_$format.gguf" "$work/m_$format.safetensors"
done
"$quantize" --in "$work/m.safetensors" --out "$work/m_fp32.gguf" --format fp32 > /dev/null
"$quantize" --in "$work/m.safetensors" --out "$work/m_f16.gguf" --format f16 > /dev/null

text_of() {  # <checkpoint> -> the greedy continuation
  "$generate" --checkpoint "$1" --prompt "12+34=" --temperature 0 --max-tokens 12 --threads 1 \
    --summary-json "$work/summary.json" > /dev/null
  "$python" -c 'import json, sys; print(json.load(open(sys.argv[1]))["text"])' "$work/summary.json"
}
same_text() {  # <a> <b>
  local a b
  a=$(text_of "$1") b=$(text_of "$2")
  [[ "$a" == "$b" ]] || { echo "greedy text differs: $1 gave '$a', $2 gave '$b'"; exit 1; }
}
same_text "$work/m.safetensors" "$work/m_fp32.gguf"
same_text "$work/m_q8_0.safetensors" "$work/m_q8_0.gguf"
same_text "$work/m_q4_0.safetensors" "$work/m_q4_0.gguf"
text_of "$work/m_f16.gguf" > /dev/null
echo "gguf_export: F32, Q8_0 and Q4_0 files give their checkpoints' greedy text; F16 runs"

if "$quantize" --in "$work/m.safetensors" --out "$work/x.gguf" --format int8_rowwise 2> "$work/err"; then
  echo "quantize wrote GGUF in a format GGUF has no type for"; exit 1
fi
grep -qF "GGUF stores linear weights as" "$work/err" || { cat "$work/err"; exit 1; }
[[ ! -e $work/x.gguf ]] || { echo "a refused GGUF was written"; exit 1; }
if "$quantize" --in "$work/m.safetensors" --out "$work/x.safetensors" --format f16 2> "$work/err"; then
  echo "quantize wrote f16 into a ctformer checkpoint"; exit 1
fi
grep -qF "f16 is a GGUF format" "$work/err" || { cat "$work/err"; exit 1; }
echo "gguf_export: formats without a GGUF type refused"
