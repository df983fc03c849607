#!/usr/bin/env bash
# train_gpt fine-tuning end to end: a base run, then --init from its
# checkpoint with --freeze (on the same text, so that step 0 is comparable;
# the tokenizer comes from the checkpoint either way). Checks that the
# fine-tuning run reports the loss before its first step (step 0, equal to
# the base run's final held-out loss when both evaluate the same text), that
# frozen tensors leave the run bit-identical and the others change, that it
# learns (its held-out loss falls), and that bad --init / --freeze input is
# refused with a message naming it.
# Usage: fine_tune.sh <train_gpt> <text file> <scratch folder>
set -euo pipefail
train_gpt=$1 text=$2 work=$3
rm -rf "$work" && mkdir -p "$work"
common=(--threads 1 --quiet --sample-tokens 0 --eval-batches 4 --batch-size 8 --seq-len 32)

"$train_gpt" "${common[@]}" --data "$text" --steps 40 --eval-every 40 --save "$work/base.safetensors" \
  --metrics "$work/base.jsonl" > /dev/null
"$train_gpt" "${common[@]}" --data "$text" --init "$work/base.safetensors" --steps 30 --eval-every 30 \
  --lr 1e-3 --warmup 5 --freeze 'token_embedding.*,position_embedding.*,blocks.[0-1].*' \
  --save "$work/tuned.safetensors" --metrics "$work/tuned.jsonl" > "$work/tuned.log"
grep -q "frozen: " "$work/tuned.log" || { echo "no frozen summary in the log"; cat "$work/tuned.log"; exit 1; }

python3 - "$work" <<'PY'
import json, struct, sys
work = sys.argv[1]
def tensors(path):
    data = open(path, "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    return {k: data[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]] for k, v in header.items()}
base = [json.loads(l) for l in open(f"{work}/base.jsonl")]
tuned = [json.loads(l) for l in open(f"{work}/tuned.jsonl")]
first = tuned[0]
assert first["step"] == 0 and first["loss"] is None, first
# The same weights on the same held-out batches: the same number, exactly.
assert first["val_loss"] == base[-1]["val_loss"], (first, base[-1])
assert tuned[-1]["step"] == 30 and tuned[-1]["val_loss"] < first["val_loss"], (first, tuned[-1])
a, b = tensors(f"{work}/base.safetensors"), tensors(f"{work}/tuned.safetensors")
frozen = [k for k in a if k.startswith(("token_embedding.", "position_embedding.", "blocks.0.", "blocks.1."))]
assert frozen, sorted(a)
for k in a:
    if k.startswith("optimizer."):
        continue
    if k in frozen:
        assert a[k] == b[k], f"frozen {k} changed"
    else:
        assert a[k] != b[k], f"trainable {k} did not change"
# Frozen tensors have no optimizer state: the moments are shorter than the parameters.
assert len(b["optimizer.m"]) < len(a["optimizer.m"]), (len(b["optimizer.m"]), len(a["optimizer.m"]))
print("fine-tune: val_loss", first["val_loss"], "->", tuned[-1]["val_loss"], ";", len(frozen), "frozen tensors unchanged")
PY

# Refusals: a pattern matching nothing, a missing checkpoint, --init with --resume.
expect_refusal() {
  local want=$1; shift
  if "$train_gpt" "${common[@]}" --data "$text" --steps 1 "$@" > "$work/refused.log" 2>&1; then
    echo "accepted: $*"; exit 1
  fi
  grep -q -- "$want" "$work/refused.log" || { echo "refusal of '$*' does not say '$want':"; cat "$work/refused.log"; exit 1; }
}
expect_refusal "token_embeddings" --init "$work/base.safetensors" --freeze 'token_embeddings.*'
expect_refusal "missing.safetensors" --init "$work/missing.safetensors"
expect_refusal "excludes" --init "$work/base.safetensors" --resume "$work/base.safetensors"
echo "fine-tune checks passed"
