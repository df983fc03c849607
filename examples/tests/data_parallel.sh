#!/usr/bin/env bash
# train_gpt under mpirun end to end: 2 ranks of batch 4 train as one process
# of batch 8 (the same losses, and parameters within the unit test's bound),
# rank 0 alone writes the checkpoint, a 2-rank checkpoint resumes in one
# process, ZeRO-1 (--zero-1) trains the same and its 2-rank checkpoint
# resumes in one process and at 4 ranks, and a rank killed mid-run ends the
# job with that rank named, within a minute, leaving the last checkpoint
# intact.
# Usage: data_parallel.sh <train_gpt> <mpirun> <text file> <scratch folder>
set -euo pipefail
train_gpt=$1 mpirun=$2 text=$3 work=$4
rm -rf "$work" && mkdir -p "$work"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl=self,vader \
  OMPI_MCA_btl_vader_single_copy_mechanism=none
base=(--data "$text" --threads 1 --quiet --sample-tokens 0 --eval-batches 4 --seq-len 32 --warmup 5)
common=("${base[@]}" --steps 30 --eval-every 30)

"$train_gpt" "${common[@]}" --batch-size 8 --save "$work/one.safetensors" --summary-json "$work/one.json" > /dev/null
"$mpirun" -np 2 --oversubscribe --bind-to none "$train_gpt" "${common[@]}" --batch-size 4 \
  --save "$work/two.safetensors" --summary-json "$work/two.json" > "$work/two.log"
grep -q "data-parallel over 2 ranks" "$work/two.log" || { echo "no data-parallel line"; cat "$work/two.log"; exit 1; }

python3 - "$work" <<'PY'
import array, json, struct, sys
work = sys.argv[1]
def tensors(path):
    data = open(path, "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    return {k: array.array("f", data[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]])
            for k, v in header.items() if v["dtype"] == "F32"}
one, two = (json.load(open(f"{work}/{r}.json")) for r in ("one", "two"))
assert two["ranks"] == 2 and one["ranks"] == 1, (one, two)
# Summation order alone differs (tests/mpi/test_data_parallel.cpp): the
# losses agree to well under 1e-4 of themselves.
for key in ("train_loss", "val_loss"):
    assert abs(one[key] - two[key]) <= 1e-4 * abs(one[key]), (key, one[key], two[key])
a, b = tensors(f"{work}/one.safetensors"), tensors(f"{work}/two.safetensors")
params = [k for k in a if not k.startswith("optimizer.")]
assert params and set(params) <= set(b), "the checkpoints hold other tensors"
worst = max(abs(x - y) for k in params for x, y in zip(a[k], b[k]))
# lr 1e-3 for 30 steps: 1e-4 is a tenth of one step (tests/mpi bounds 20 steps at 3e-3 the same way).
assert worst <= 1e-4, f"parameters differ by {worst}"
print(f"2 ranks against 1 process: losses agree, largest parameter difference {worst:.2e}")
PY

# A checkpoint written by 2 ranks resumes in one process.
"$mpirun" -np 2 --oversubscribe --bind-to none "$train_gpt" "${common[@]}" --batch-size 4 --stop-after 20 \
  --save "$work/part.safetensors" > /dev/null
"$train_gpt" "${common[@]}" --batch-size 8 --resume "$work/part.safetensors" --summary-json "$work/resumed.json" \
  > /dev/null
python3 -c "
import json, sys
r, one = json.load(open('$work/resumed.json')), json.load(open('$work/one.json'))
assert r['steps'] == 30 and abs(r['val_loss'] - one['val_loss']) <= 1e-4 * one['val_loss'], (r, one)
print('a 2-rank checkpoint resumed in one process to the same loss')"

# ZeRO-1: the same run, and a checkpoint of 2 sharded ranks resumes in one
# process (whole state) and at 4 sharded ranks.
run_ranks() { local n=$1; shift; "$mpirun" -np "$n" --oversubscribe --bind-to none "$train_gpt" "$@"; }
run_ranks 2 "${common[@]}" --batch-size 4 --zero-1 --summary-json "$work/zero.json" > "$work/zero.log"
grep -q "ZeRO-1: optimizer state" "$work/zero.log" || { echo "no ZeRO-1 line"; cat "$work/zero.log"; exit 1; }
run_ranks 2 "${common[@]}" --batch-size 4 --zero-1 --stop-after 20 --save "$work/zero_part.safetensors" > /dev/null
"$train_gpt" "${common[@]}" --batch-size 8 --resume "$work/zero_part.safetensors" \
  --summary-json "$work/zero_resumed_1.json" > /dev/null
run_ranks 4 "${common[@]}" --batch-size 2 --zero-1 --resume "$work/zero_part.safetensors" \
  --summary-json "$work/zero_resumed_4.json" > /dev/null
python3 - "$work" <<'PY'
import json, sys
work = sys.argv[1]
one = json.load(open(f"{work}/one.json"))
for name in ("zero", "zero_resumed_1", "zero_resumed_4"):
    r = json.load(open(f"{work}/{name}.json"))
    assert r["steps"] == 30, (name, r)
    for key in ("train_loss", "val_loss"):
        assert abs(r[key] - one[key]) <= 1e-4 * abs(one[key]), (name, key, r[key], one[key])
print("ZeRO-1 at 2 ranks trains as one process; its checkpoint resumes in one process and at 4 ranks")
PY

# Rank 1 killed mid-run: the job ends, naming the rank, and the checkpoint
# written before stays whole (it resumes).
"$mpirun" -np 2 --oversubscribe --bind-to none "$train_gpt" "${base[@]}" --batch-size 4 --steps 100000 \
  --eval-every 0 --checkpoint-every 5 --save "$work/killed.safetensors" > "$work/killed.log" 2>&1 &
launcher=$!
for _ in $(seq 1 300); do [[ -f $work/killed.safetensors ]] && break; sleep 0.2; done
[[ -f $work/killed.safetensors ]] || { echo "no checkpoint before the kill"; cat "$work/killed.log"; exit 1; }
rank1=""
for pid in $(pgrep -P "$launcher"); do
  tr '\0' '\n' < "/proc/$pid/environ" 2>/dev/null | grep -qx OMPI_COMM_WORLD_RANK=1 && rank1=$pid
done
[[ -n $rank1 ]] || { echo "rank 1's process not found"; exit 1; }
kill -9 "$rank1"
start=$SECONDS
status=0
timeout 60 tail --pid="$launcher" -f /dev/null || { echo "the job outlived its killed rank by a minute"; exit 1; }
wait "$launcher" || status=$?
((status != 0)) || { echo "the job exited 0 after a rank was killed"; exit 1; }
grep -qi "rank 1" "$work/killed.log" || { echo "the job's error does not name rank 1:"; cat "$work/killed.log"; exit 1; }
echo "rank 1 killed: the job ended in $((SECONDS - start)) s with status $status, naming rank 1"
"$train_gpt" "${base[@]}" --batch-size 8 --steps 100000 --stop-after 6 --eval-every 0 \
  --resume "$work/killed.safetensors" > /dev/null
echo "the checkpoint written before the kill resumes"

# Rank 1 stopped (SIGSTOP: alive, never answering): rank 0 gives up after
# --rank-timeout and names it, and the job ends.
"$mpirun" -np 2 --oversubscribe --bind-to none "$train_gpt" "${base[@]}" --batch-size 4 --steps 100000 \
  --eval-every 0 --checkpoint-every 5 --rank-timeout 3 --save "$work/hung.safetensors" > "$work/hung.log" 2>&1 &
launcher=$!
for _ in $(seq 1 300); do [[ -f $work/hung.safetensors ]] && break; sleep 0.2; done
rank1=""
for pid in $(pgrep -P "$launcher"); do
  tr '\0' '\n' < "/proc/$pid/environ" 2>/dev/null | grep -qx OMPI_COMM_WORLD_RANK=1 && rank1=$pid
done
[[ -n $rank1 ]] || { echo "rank 1's process not found"; exit 1; }
kill -STOP "$rank1"
start=$SECONDS
timeout 60 tail --pid="$launcher" -f /dev/null || { kill -9 "$rank1"; echo "the job outlived its hung rank by a minute"; exit 1; }
status=0
wait "$launcher" || status=$?
((status != 0)) || { echo "the job exited 0 with a hung rank"; exit 1; }
grep -q "rank 1 did not answer" "$work/hung.log" || { echo "rank 0 did not name rank 1:"; cat "$work/hung.log"; exit 1; }
echo "rank 1 hung: the job ended in $((SECONDS - start)) s with status $status, rank 0 naming rank 1"
