#!/usr/bin/env bash
# batch_infer end to end: one uninterrupted run, then the same input run again
# and again, each killed with SIGKILL after a growing delay, then resumed to
# the end. The resumed output must hold every input line exactly once, no id
# twice, no half line, and the same results as the uninterrupted run (each
# record's tokens do not depend on what runs beside it). Bad lines become
# error records naming their line.
# Usage: batch_infer_resume.sh <train_gpt> <batch_infer> <scratch folder>
set -euo pipefail
train_gpt=$1 batch_infer=$2 work=$3
rm -rf "$work" && mkdir -p "$work"
"$train_gpt" --steps 30 --eval-every 0 --threads 1 --quiet --batch-size 8 --save "$work/model.safetensors" > /dev/null

python3 - "$work/input.jsonl" <<'EOF'
import json, random, sys
random.seed(7)
lines = []
for i in range(6000):
    a, b = random.randrange(100), random.randrange(100)
    record = {"id": f"r{i}", "prompt": f"{a}+{b}=", "max_tokens": random.randrange(4, 24), "seed": i}
    if i % 3 == 0: record["temperature"] = 0
    if i % 7 == 0: record["n"] = 2
    lines.append(json.dumps(record))
lines[10] = '{"id": "broken", "prompt": '                      # malformed JSON
lines[20] = json.dumps({"id": "typo", "prompt": "1+1=", "max_token": 3})   # unknown field
lines[30] = json.dumps({"id": "type", "prompt": 12})                      # wrong type
lines[40] = json.dumps({"id": "r1", "prompt": "2+2="})                   # repeated id
lines[50] = json.dumps({"prompt": "3+4=", "max_tokens": 5})              # no id: the line number is its id
lines[60] = json.dumps({"id": "unknown", "prompt": "hello"})              # characters outside the vocabulary
open(sys.argv[1], "w").write("\n".join(lines) + "\n")
EOF

common=(--checkpoint "$work/model.safetensors" --input "$work/input.jsonl" --threads 1 --no-progress)
"$batch_infer" "${common[@]}" --output "$work/straight.jsonl" --summary-json "$work/summary.json" 2> "$work/straight.log"

kills=0
for delay in 0.1 0.2 0.3 0.45 0.6 0.8 1.0 1.3 1.6 2.0; do
  "$batch_infer" "${common[@]}" --output "$work/resumed.jsonl" 2>> "$work/resumed.log" &
  pid=$!
  sleep "$delay"
  if kill -9 "$pid" 2> /dev/null; then kills=$((kills + 1)); fi
  wait "$pid" 2> /dev/null || true
done
# A line cut short, as if the process died inside a write: it must be dropped.
printf '{"id": "r5999", "line": 6000, "prompt_tok' >> "$work/resumed.jsonl"
"$batch_infer" "${common[@]}" --output "$work/resumed.jsonl" 2>> "$work/resumed.log"
# Once everything is written, a rerun writes nothing.
"$batch_infer" "${common[@]}" --output "$work/resumed.jsonl" 2>> "$work/resumed.log"

python3 - "$work" "$kills" <<'EOF'
import json, sys
work, kills = sys.argv[1], int(sys.argv[2])
def records(name):
    text = open(f"{work}/{name}").read()
    assert text.endswith("\n"), f"{name} ends inside a line"
    return [json.loads(line) for line in text.splitlines()]
straight, resumed = records("straight.jsonl"), records("resumed.jsonl")
for name, rs in (("straight", straight), ("resumed", resumed)):
    lines = sorted(r["line"] for r in rs)
    assert lines == list(range(1, 6001)), f"{name}: lines written {len(lines)}, distinct {len(set(lines))}"
    ids = [json.dumps(r["id"]) for r in rs if r["id"] is not None]
    assert len(ids) == len(set(ids)), f"{name}: an id was written twice"
by_line = lambda rs: {r["line"]: r for r in rs}
a, b = by_line(straight), by_line(resumed)
assert a == b, "resumed results differ: " + str([k for k in a if a[k] != b[k]][:5])
errors = {r["line"]: r["error"] for r in straight if "error" in r}
assert sorted(errors) == [11, 21, 31, 41, 61], errors
assert "not valid JSON" in errors[11] and "line 11" in errors[11]
assert 'unknown field "max_token"' in errors[21]
assert '"prompt" must be a string' in errors[31]
assert "earlier line" in errors[41] and a[41]["id"] is None
assert "line 61" in errors[61] and "character" in errors[61]
assert a[51]["id"] == 51 and a[51]["output_tokens"] <= 5
ok = [r for r in straight if "error" not in r]
assert all(r["finish_reason"] in ("stop", "length") for r in ok)
for r in ok:  # records with n = 2 (every 7th) report both samples
    assert (len(r.get("choices", [])) == 2) == ((r["line"] - 1) % 7 == 0), r
summary = json.load(open(f"{work}/summary.json"))
assert summary["records_written"] == 6000 and summary["error_records"] == 5, summary
assert summary["output_tokens"] == sum(r["output_tokens"] for r in ok), summary
assert summary["output_tokens_per_day"] > 0 and summary["input_tokens_per_day"] > 0
assert kills >= 3, f"only {kills} runs were still going when killed: the kill test tested little"
print(f"batch_infer: 6000 lines, 5 error records, {kills} kills resumed to the same output")
EOF
