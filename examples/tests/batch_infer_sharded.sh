#!/usr/bin/env bash
# batch_infer under mpirun: 2 ranks write exactly the single process's
# results, merged into one file in input order with no part files left; a
# 2-rank job stopped mid-run resumes to the same file; a single process's
# partial output is finished by 3 ranks; a repeated id is found across ranks.
# Usage: batch_infer_sharded.sh <train_gpt> <batch_infer> <mpirun> <scratch folder>
set -euo pipefail
train_gpt=$1 batch_infer=$2 mpirun=$3 work=$4
rm -rf "$work" && mkdir -p "$work"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl=self,vader \
  OMPI_MCA_btl_vader_single_copy_mechanism=none
ranks() { local n=$1; shift; "$mpirun" -np "$n" --oversubscribe --bind-to none "$@"; }
# Waits until the files matching a glob hold at least N lines in all (or 30 s pass).
wait_for_lines() {
  local n=$1 pattern=$2
  for _ in $(seq 1 600); do
    (($(cat $pattern 2> /dev/null | wc -l) >= n)) && return 0
    sleep 0.05
  done
}
"$train_gpt" --steps 30 --eval-every 0 --threads 1 --quiet --batch-size 8 --save "$work/model.safetensors" > /dev/null

python3 - "$work/input.jsonl" <<'PY'
import json, random, sys
random.seed(11)
lines = []
for i in range(6000):
    a, b = random.randrange(100), random.randrange(100)
    record = {"id": f"r{i}", "prompt": f"{a}+{b}=", "max_tokens": random.randrange(4, 24), "seed": i}
    if i % 3 == 0: record["temperature"] = 0
    if i % 7 == 0: record["n"] = 2
    lines.append(json.dumps(record))
lines[10] = '{"id": "broken", "prompt": '                   # malformed JSON (line 11: rank 1 of 2)
lines[40] = json.dumps({"id": "r1", "prompt": "2+2="})    # line 41 repeats line 2's id (another rank's)
lines[50] = json.dumps({"prompt": "3+4=", "max_tokens": 5})  # no id
open(sys.argv[1], "w").write("\n".join(lines) + "\n")
PY

common=(--checkpoint "$work/model.safetensors" --input "$work/input.jsonl" --threads 1 --no-progress)
"$batch_infer" "${common[@]}" --output "$work/straight.jsonl" 2> "$work/straight.log"
ranks 2 "$batch_infer" "${common[@]}" --output "$work/sharded.jsonl" --summary-json "$work/sharded.json" \
  2> "$work/sharded.log"

# Every rank killed mid-run (SIGKILL, as a machine's crash would), then resumed.
ranks 2 "$batch_infer" "${common[@]}" --output "$work/resumed.jsonl" 2> "$work/resumed.log" &
launcher=$!
wait_for_lines 1000 "$work/resumed.jsonl.part-*"
rank_pids=$(pgrep -P "$launcher" || true)
kill -9 $rank_pids "$launcher" 2> /dev/null || true
wait "$launcher" 2> /dev/null || true
for pid in $rank_pids; do while kill -0 "$pid" 2> /dev/null; do sleep 0.05; done; done
ls "$work" | grep -q "resumed.jsonl.part-" || { echo "the 2-rank run was not stopped mid-run"; exit 1; }
[[ ! -s $work/resumed.jsonl ]] || { echo "a stopped job merged its parts"; exit 1; }
ranks 2 "$batch_infer" "${common[@]}" --output "$work/resumed.jsonl" 2>> "$work/resumed.log"

# A single process's partial output (killed mid-run), finished by 3 ranks.
"$batch_infer" "${common[@]}" --output "$work/mixed.jsonl" 2> "$work/mixed.log" &
single=$!
wait_for_lines 1000 "$work/mixed.jsonl"
kill -9 "$single" 2> /dev/null || true
wait "$single" 2> /dev/null || true
(($(wc -l < "$work/mixed.jsonl") < 6000)) || { echo "the single process was not stopped mid-run"; exit 1; }
ranks 3 "$batch_infer" "${common[@]}" --output "$work/mixed.jsonl" 2>> "$work/mixed.log"

python3 - "$work" <<'PY'
import json, os, sys
work = sys.argv[1]
def records(name):
    text = open(f"{work}/{name}").read()
    assert text.endswith("\n"), f"{name} ends inside a line"
    return [json.loads(line) for line in text.splitlines()]
straight = {r["line"]: r for r in records("straight.jsonl")}
assert sorted(straight) == list(range(1, 6001)), len(straight)
for name in ("sharded.jsonl", "resumed.jsonl", "mixed.jsonl"):
    rs = records(name)
    lines = [r["line"] for r in rs]
    assert lines == list(range(1, 6001)), f"{name}: not every line once in input order ({len(lines)} lines)"
    got = {r["line"]: r for r in rs}
    assert got == straight, f"{name} differs from one process: " + str([k for k in got if got[k] != straight[k]][:5])
left = [f for f in os.listdir(work) if ".part-" in f]
assert not left, f"part files left: {left}"
assert "earlier line" in straight[41]["error"] and straight[41]["id"] is None, straight[41]
assert "not valid JSON" in straight[11]["error"], straight[11]
summary = json.load(open(f"{work}/sharded.json"))
assert summary["ranks"] == 2 and summary["records_written"] == 6000 and summary["error_records"] == 2, summary
ok = [r for r in straight.values() if "error" not in r]
assert summary["output_tokens"] == sum(r["output_tokens"] for r in ok), summary
print("2 and 3 ranks wrote the single process's 6000 results in input order, resumed after a stop")
PY
