#!/usr/bin/env bash
# serve end to end, as clients see it: the program listens on a free port,
# /health turns 200 once the model is loaded; the `openai` Python client gets
# completions, chat and streams; plain HTTP gets the OpenAI shapes and a 400
# for each bad request; 64 concurrent clients x 4 requests all get complete
# answers and /metrics adds up to them; SIGTERM during a stream lets it
# finish before exit 0.
# Usage: serve_end_to_end.sh <train_gpt> <serve> <scratch folder> <text file> <python with openai>
set -euo pipefail
train_gpt=$1 serve=$2 work=$3 text=$4 python=$5
rm -rf "$work" && mkdir -p "$work"
"$python" -c "import openai" 2> /dev/null || {
  echo "$python has no 'openai' package: scripts/test.sh makes a virtual environment with it"
  exit 1
}
# A character-level Shakespeare model: its characters cover the chat template.
"$train_gpt" --data "$text" --preset nanogpt-cpu --steps 20 --eval-every 0 --sample-tokens 0 --threads 1 --quiet \
  --batch-size 8 --save "$work/model.safetensors" > /dev/null

"$serve" --checkpoint "$work/model.safetensors" --port 0 --threads 1 --model-name bard > "$work/serve.log" 2>&1 &
pid=$!
trap 'kill -9 $pid 2> /dev/null || true' EXIT
for _ in $(seq 100); do
  grep -q 'listening on' "$work/serve.log" && break
  sleep 0.1
done
port=$(sed -n 's/.*listening on http:\/\/[^:]*:\([0-9]*\).*/\1/p' "$work/serve.log")
[[ -n "$port" ]] || { cat "$work/serve.log"; exit 1; }

"$python" - "$port" "$pid" <<'EOF'
import json, os, signal, sys, threading, time, urllib.error, urllib.request
import openai

port, pid = int(sys.argv[1]), int(sys.argv[2])
base = f"http://127.0.0.1:{port}"
served = {"requests": 0, "prompt": 0, "completion": 0}  # what the engine ran, from each usage
lock = threading.Lock()

def count(usage):
    with lock:
        served["requests"] += 1
        served["prompt"] += usage["prompt_tokens"]
        served["completion"] += usage["completion_tokens"]

def call(path, body=None):
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    request = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, r.read().decode(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), dict(e.headers)

deadline = time.time() + 30
while True:
    try:
        if call("/health")[0] == 200: break
    except urllib.error.URLError:
        pass
    assert time.time() < deadline, "the model never became ready"
    time.sleep(0.05)

# The openai client: completion, stream, chat, chat stream, an error.
client = openai.OpenAI(base_url=base + "/v1", api_key="unused")
assert [m.id for m in client.models.list().data] == ["bard"]
whole = client.completions.create(model="bard", prompt="ROMEO:", max_tokens=12, temperature=0)
assert whole.object == "text_completion" and len(whole.choices) == 1 and whole.usage.completion_tokens == 12
count(whole.usage.model_dump())
text = whole.choices[0].text
streamed = ""
for chunk in client.completions.create(model="bard", prompt="ROMEO:", max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True}):
    if chunk.choices: streamed += chunk.choices[0].text
    if chunk.usage: count(chunk.usage.model_dump())
assert streamed == text, (streamed, text)
chat = client.chat.completions.create(model="bard", messages=[{"role": "user", "content": "Speak."}], max_tokens=8,
                                      temperature=0)
assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 8
count(chat.usage.model_dump())
pieces = []
for chunk in client.chat.completions.create(model="bard", messages=[{"role": "user", "content": "Speak."}],
                                            max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True}):
    if chunk.choices and chunk.choices[0].delta.content: pieces.append(chunk.choices[0].delta.content)
    if chunk.usage: count(chunk.usage.model_dump())
assert "".join(pieces) == chat.choices[0].message.content
try:
    client.completions.create(model="bard", prompt="x", max_tokens=100000)
    raise AssertionError("a request over the context was accepted")
except openai.BadRequestError as e:
    assert e.code == "context_length_exceeded", e

# Plain HTTP: each bad request gets 400 (404 for another model) with an error object.
bad = [
    (b'{"model": "bard", "prompt": ', None, 400),
    ({"model": "bard", "prompt": "a", "max_tokens": "five"}, "max_tokens", 400),
    ({"model": "bard", "prompt": "a", "temperature": 3}, "temperature", 400),
    ({"model": "bard", "prompt": "a", "stream": "yes"}, "stream", 400),
    ({"model": "bard", "prompt": "a", "surprise": 1}, "surprise", 400),
    ({"model": "bard", "prompt": "\u00e9t\u00e9"}, "prompt", 400),
    ({"model": "bard"}, "prompt", 400),
    ({"model": "other", "prompt": "a"}, "model", 404),
]
for body, param, status in bad:
    got, text_body, _ = call("/v1/completions", body)
    error = json.loads(text_body)["error"]
    assert got == status and error["type"] and error["message"], (body, got, text_body)
    if param: assert error["param"] == param, (body, error)

# 64 clients x 4 requests at once, streamed and not: every one complete.
failures = []
def client_thread(c):
    for i in range(4):
        body = {"model": "bard", "prompt": ["KING", "QUEEN", "DUKE", "FRIAR"][i] + " " * (c % 5) + ":", "max_tokens": 4 + (c + i) % 9, "seed": c * 10 + i}
        if (c + i) % 2:
            body.update(stream=True, stream_options={"include_usage": True})
        status, reply, _ = call("/v1/completions", body)
        if status != 200:
            failures.append((status, reply)); continue
        if body.get("stream"):
            events = [l[6:] for l in reply.split("\n") if l.startswith("data: ")]
            if events[-1] != "[DONE]": failures.append(("no [DONE]", reply)); continue
            chunks = [json.loads(e) for e in events[:-1]]
            finished = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
            if len(finished) != 1: failures.append(("finish", reply)); continue
            count(chunks[-1]["usage"])
        else:
            r = json.loads(reply)
            if r["choices"][0]["finish_reason"] not in ("stop", "length"): failures.append(("finish", reply)); continue
            count(r["usage"])
threads = [threading.Thread(target=client_thread, args=(c,)) for c in range(64)]
for t in threads: t.start()
for t in threads: t.join()
assert not failures, failures[:3]

status, metrics, _ = call("/metrics")
assert status == 200
def metric(prefix):
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith(prefix) and not line.startswith("#"))
assert metric("ctformer:request_success_total") == served["requests"], (metric("ctformer:request_success_total"), served)
assert metric("ctformer:prompt_tokens_total") == served["prompt"], served
assert metric("ctformer:generation_tokens_total") == served["completion"], served
assert metric("ctformer:num_requests_running") == 0 and metric("ctformer:num_requests_waiting") == 0

# SIGTERM while a stream runs: the stream ends with [DONE], the program exits 0.
result = {}
def long_stream():
    result["response"] = call("/v1/completions", {"model": "bard", "prompt": "HAMLET:", "max_tokens": 50, "stream": True})
worker = threading.Thread(target=long_stream)
worker.start()
time.sleep(0.05)
os.kill(pid, signal.SIGTERM)
worker.join()
status, body, _ = result["response"]
assert status == 200 and body.rstrip().endswith("data: [DONE]"), body
print(f"serve: openai client, {len(bad)} bad requests, {served['requests']} requests counted, SIGTERM drained")
EOF
wait "$pid"
trap - EXIT
grep -q 'serve: stopped' "$work/serve.log"
