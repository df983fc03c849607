#!/usr/bin/env bash
# Quantizes a train_gpt checkpoint into every weight format and measures each
# one's validation perplexity and weight bytes (the table in docs/quantization.md).
# usage: scripts/quantization_table.sh BUILD_DIR CHECKPOINT DATA OUT_DIR
set -euo pipefail
build=$1 ckpt=$2 data=$3 out=$4
mkdir -p "$out"
"$build/examples/eval_perplexity" --checkpoint "$ckpt" --data "$data" --split val --summary-json "$out/fp32.json"
for format in bf16 int8_rowwise q8_0 q4_0 prune50 prune2of4; do
  "$build/examples/quantize" --in "$ckpt" --out "$out/$format.ckpt" --format "$format" --summary-json "$out/$format.quantize.json"
  "$build/examples/eval_perplexity" --checkpoint "$out/$format.ckpt" --data "$data" --split val --summary-json "$out/$format.json"
done
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
base = json.load(open(f"{out}/fp32.json"))
print("| format | perplexity | vs fp32 | weight bytes | vs fp32 |")
print("| --- | ---: | ---: | ---: | ---: |")
for f in ["fp32", "bf16", "int8_rowwise", "q8_0", "q4_0", "prune50", "prune2of4"]:
    r = json.load(open(f"{out}/{f}.json"))
    print(f"| {f} | {r['perplexity']:.4f} | {100 * (r['perplexity'] / base['perplexity'] - 1):+.2f}% | "
          f"{r['bytes']:,} | {100 * r['bytes'] / base['bytes']:.1f}% |")
PY
