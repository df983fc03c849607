#!/usr/bin/env bash
# The tools on models from elsewhere: a Hugging Face folder or llama2.c file
# of an unregistered shape is refused with the fields that differ from each
# registered configuration; with ../shared's stories260K (optional: skipped
# when absent), generate and batch_infer run it from token-id prompts, and
# greedy decoding gives the tokens of run.c's forward
# (tests/data/stories260K_reference.json: after "1" comes 461, after "1 403" 422).
# Usage: pretrained_models.sh <generate> <batch_infer> <tests/data> <shared data> <scratch folder>
set -euo pipefail
generate=$1 batch_infer=$2 data=$3 shared=$4 work=$5
rm -rf "$work" && mkdir -p "$work"

expect_refusal() {  # <model> <text the error must hold>...
  local model=$1; shift
  if "$generate" --checkpoint "$model" --prompt "1" --max-tokens 2 > "$work/out" 2> "$work/err"; then
    echo "generate ran $model, which no configuration holds"; exit 1
  fi
  for text in "$@"; do
    grep -qF -- "$text" "$work/err" || { echo "missing from the error: $text"; cat "$work/err"; exit 1; }
  done
}
expect_refusal "$data/hf/gpt2_tiny" "none of this program's configurations holds" "gpt2-small:" \
  "n_embd: the file has 32, the configuration 768" "add a configuration struct"
expect_refusal "$data/hf/llama_tiny" "smollm-135m:" "hidden_size: the file has 32, the configuration 576"
expect_refusal "$data/llama2c_tiny.bin" "stories260K:" "dim: the file has 32, the configuration 64"
echo "pretrained_models: unregistered shapes refused with their differences"

stories=$shared/stories260K/stories260K.bin
if [[ ! -f $stories ]]; then
  echo "pretrained_models: skipped the stories260K runs: $stories is not here (optional shared data)"
  exit 0
fi
"$generate" --checkpoint "$stories" --prompt "1" --temperature 0 --max-tokens 12 --threads 1 \
  --summary-json "$work/one.json" > "$work/one.txt"
"$generate" --checkpoint "$stories" --prompt "1 403" --temperature 0 --max-tokens 12 --threads 1 \
  --summary-json "$work/two.json" > /dev/null
if "$generate" --checkpoint "$stories" --prompt "Once upon" --max-tokens 2 2> "$work/err"; then
  echo "generate took a text prompt for a model without a tokenizer"; exit 1
fi
grep -qF "is not a token id" "$work/err" || { cat "$work/err"; exit 1; }
printf '%s\n' '{"id": "a", "prompt": "1", "max_tokens": 12, "temperature": 0}' \
  '{"id": "b", "prompt": "1 403", "max_tokens": 12, "temperature": 0}' > "$work/in.jsonl"
"$batch_infer" --checkpoint "$stories" --input "$work/in.jsonl" --output "$work/out.jsonl" --threads 1 > /dev/null
python3 - "$work" <<'PY'
import json, pathlib, sys
work = pathlib.Path(sys.argv[1])
one = json.loads((work / "one.json").read_text())["text"].split()
two = json.loads((work / "two.json").read_text())["text"].split()
assert one[0] == "461", f"after 1, greedy gave {one[0]}, run.c's forward 461"
assert two[0] == "422", f"after 1 403, greedy gave {two[0]}, run.c's forward 422"
assert len(one) == 12, one
records = {r["id"]: r for r in map(json.loads, (work / "out.jsonl").read_text().splitlines())}
assert records["a"]["text"].split() == one, (records["a"], one)
assert records["b"]["text"].split() == two, (records["b"], two)
print("pretrained_models: stories260K greedy tokens match run.c's forward; batch_infer agrees with generate")
PY
