#!/usr/bin/env python3
"""Decode and prefill tokens/s: ctformer (bench_decode) against llama.cpp on this machine.

PEERS.md measured llama.cpp on another machine (Sapphire Rapids, AMX). This
script measures it here, on the same LLaMA-shaped model as bench_decode
(d_model 768, 12 layers, 12 heads, d_ff 2048, vocabulary 32000, RMSNorm,
RoPE base 10000, tied embeddings, random weights), so that the comparison is
a ratio taken in one session on one machine. The rounds alternate (llama.cpp,
then ctformer, per format and thread count), because this machine's memory
bandwidth moves by tens of percent from one minute to the next.

    tools/build_llama_cpp.sh /tmp/llama.cpp            # once: llama-bench, llama-quantize
    python3 tools/compare_llama_cpp.py --llama-cpp /tmp/llama.cpp/build/bin \\
        --bench build/bench/bench_decode

What each side runs:
- llama.cpp: llama-bench -p 512 -n 128 -fa 0 (prefill of a 512-token prompt;
  128 decode steps starting from an empty cache, F16 KV cache), the GGUF
  files written here (F32) and quantized by llama-quantize (Q8_0, Q4_0 with
  its default Q6_K for the tied embedding/output matrix, as in PEERS.md).
- ctformer: bench_decode's LLaMA rows: prefill 512 and decode at context 128
  (a bf16 KV cache, the same bytes per element as F16). Decode at context 128
  reads more cache per token than llama.cpp's steps from 0 to 128 do, so
  the decode ratio slightly favours llama.cpp.
- With --long-context, a third pair: llama-bench -p 0 -n 128 -d 960 (128
  steps after a 960-token prompt: contexts 960 to 1088, 1024 on average)
  against bench_decode's decode at context 1024, where the cache's reads
  are a quarter (q8_0) to a third (q4_0) of each token's bytes.

- With --batched, batched decode instead: llama-batched-bench -npp 64 -ntg
  128 -npl 1,4,16,64 (N sequences each prefill 64 tokens, then decode 128
  steps together: contexts 64 to 192, 128 on average; S_TG, the aggregate
  generation tokens/s) against bench_batched_decode's aggregate decode
  tokens/s of N sequences at context 128 (a paged bf16 cache).

Needs numpy and gguf (pip install numpy gguf).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

import numpy as np

D_MODEL, LAYERS, HEADS, D_FF, VOCAB, CONTEXT = 768, 12, 12, 2048, 32000, 2048
FORMATS = {"fp32": ("F32", "quant::fp32"), "q8_0": ("Q8_0", "quant::q8_0"), "q4_0": ("Q4_0", "quant::q4_0")}


def write_gguf(path):
    """The LLaMA-shaped model with random weights, F32, in llama.cpp's tensor names."""
    import gguf

    rng = np.random.default_rng(0)

    def random(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(D_MODEL)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(D_FF)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(HEADS)
    writer.add_rope_dimension_count(D_MODEL // HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)
    writer.add_file_type(0)  # all F32
    # A SentencePiece-style vocabulary: control tokens, the 256 byte tokens,
    # then filler pieces. llama-bench feeds random token ids, so only the
    # count matters.
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"piece{i}" for i in range(VOCAB - len(tokens))]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    types += [gguf.TokenType.NORMAL] * (VOCAB - len(types))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * VOCAB)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    # numpy shapes are (out, in); tied embeddings: no output.weight.
    writer.add_tensor("token_embd.weight", random(VOCAB, D_MODEL))
    writer.add_tensor("output_norm.weight", np.ones(D_MODEL, dtype=np.float32))
    for layer in range(LAYERS):
        p = f"blk.{layer}."
        writer.add_tensor(p + "attn_norm.weight", np.ones(D_MODEL, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(p + name + ".weight", random(D_MODEL, D_MODEL))
        writer.add_tensor(p + "ffn_norm.weight", np.ones(D_MODEL, dtype=np.float32))
        writer.add_tensor(p + "ffn_gate.weight", random(D_FF, D_MODEL))
        writer.add_tensor(p + "ffn_up.weight", random(D_FF, D_MODEL))
        writer.add_tensor(p + "ffn_down.weight", random(D_MODEL, D_FF))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def model_files(llama_bin, directory):
    """F32, Q8_0 and Q4_0 GGUF files of the model (written once, then reused)."""
    os.makedirs(directory, exist_ok=True)
    files = {fmt: os.path.join(directory, f"llama_110m_{ggml}.gguf") for fmt, (ggml, _) in FORMATS.items()}
    if not os.path.exists(files["fp32"]):
        print(f"writing {files['fp32']}", file=sys.stderr, flush=True)
        write_gguf(files["fp32"] + ".partial")
        os.replace(files["fp32"] + ".partial", files["fp32"])
    for fmt in ("q8_0", "q4_0"):
        if not os.path.exists(files[fmt]):
            subprocess.run([os.path.join(llama_bin, "llama-quantize"), files["fp32"], files[fmt] + ".partial",
                            FORMATS[fmt][0]], check=True, capture_output=True)
            os.replace(files[fmt] + ".partial", files[fmt])
    return files


def llama_cpp(llama_bin, model, threads, repetitions):
    """(prefill 512 tok/s, decode tok/s) from llama-bench, each the mean of its repetitions."""
    run = subprocess.run([os.path.join(llama_bin, "llama-bench"), "-m", model, "-t", str(threads), "-p", "512",
                          "-n", "128", "-fa", "0", "-r", str(repetitions), "-o", "json"],
                         capture_output=True, text=True, check=True)
    rows = json.loads(run.stdout)
    prefill = next(r["avg_ts"] for r in rows if r["n_prompt"] == 512 and r["n_gen"] == 0)
    decode = next(r["avg_ts"] for r in rows if r["n_prompt"] == 0 and r["n_gen"] == 128)
    return prefill, decode


def llama_cpp_long(llama_bin, model, threads, repetitions):
    """Decode tok/s over contexts 960-1088 (mean 1024) from llama-bench -d 960."""
    run = subprocess.run([os.path.join(llama_bin, "llama-bench"), "-m", model, "-t", str(threads), "-p", "0",
                          "-n", "128", "-d", "960", "-fa", "0", "-r", str(repetitions), "-o", "json"],
                         capture_output=True, text=True, check=True)
    rows = json.loads(run.stdout)
    return next(r["avg_ts"] for r in rows if r["n_gen"] == 128)


def ctformer(bench, fmt, threads, long_context=False):
    """(prefill 512 tok/s, decode tok/s at context 128[, decode tok/s at context 1024]) from bench_decode."""
    tag = FORMATS[fmt][1]
    contexts = "(0|1)" if long_context else "0"
    pattern = (f"bm_(prefill<llama_110m, {tag}>/threads:{threads}/|"
               f"decode<llama_110m, {tag}>/long_context:{contexts}/threads:{threads}/)")
    run = subprocess.run([bench, "--benchmark_format=json", f"--benchmark_filter={pattern}"],
                         capture_output=True, text=True, check=True)
    # bench_decode prints its measured bandwidth before the JSON.
    rows = json.loads(run.stdout[run.stdout.index("{"):])["benchmarks"]
    prefill = next(r["tok/s"] for r in rows if r["name"].startswith("bm_prefill"))
    decode = next(r["tok/s"] for r in rows if "long_context:0" in r["name"])
    if not long_context:
        return prefill, decode
    return prefill, decode, next(r["tok/s"] for r in rows if "long_context:1" in r["name"])


def llama_cpp_batched(llama_bin, model, threads, sequences):
    """{N: aggregate generation tok/s (S_TG)} from llama-batched-bench, N parallel sequences."""
    context = max(sequences) * (64 + 128)
    run = subprocess.run([os.path.join(llama_bin, "llama-batched-bench"), "-m", model, "-t", str(threads),
                          "-tb", str(threads), "-c", str(context), "-b", "2048", "-ub", "512", "-fa", "off",
                          "-npp", "64", "-ntg", "128", "-npl", ",".join(str(n) for n in sequences),
                          "--output-format", "jsonl"], capture_output=True, text=True, check=True)
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    return {r["pl"]: r["speed_tg"] for r in rows}


def ctformer_batched(bench, fmt, threads, sequences):
    """({N: aggregate decode tok/s at context 128}, prefill 512 tok/s) from bench_batched_decode."""
    tag = FORMATS[fmt][1]
    pattern = (f"bm_(prefill<{tag}>/threads:{threads}/|batched_decode<{tag}>/sequences:"
               f"({'|'.join(str(n) for n in sequences)})/context:128/threads:{threads}/)")
    run = subprocess.run([bench, "--benchmark_format=json", f"--benchmark_filter={pattern}"],
                         capture_output=True, text=True, check=True)
    rows = json.loads(run.stdout[run.stdout.index("{"):])["benchmarks"]
    prefill = next(r["tok/s"] for r in rows if r["name"].startswith("bm_prefill"))
    decode = {int(r["sequences"]): r["tok/s"] for r in rows if r["name"].startswith("bm_batched_decode")}
    return decode, prefill


def batched(args, files):
    sequences = [1, 4, 16, 64]
    bench = args.bench if "batched" in args.bench else os.path.join(os.path.dirname(args.bench), "bench_batched_decode")
    print(f"{'weights':7} {'thr':>3} {'seqs':>4} | {'S_TG llama.cpp':>14} {'ctformer':>9} {'ratio':>6} |"
          f" {'ctformer prefill 512':>20} {'decode/prefill':>14}", flush=True)
    for fmt in args.formats.split(","):
        for threads in (int(t) for t in args.threads.split(",")):
            theirs, ours, prefills = [], [], []
            for _ in range(args.rounds):
                theirs.append(llama_cpp_batched(args.llama_cpp, files[fmt], threads, sequences))
                decode, prefill = ctformer_batched(bench, fmt, threads, sequences)
                ours.append(decode)
                prefills.append(prefill)
            prefill = statistics.median(prefills)
            for n in sequences:
                lm = statistics.median(t[n] for t in theirs)
                cm = statistics.median(o[n] for o in ours)
                print(f"{fmt:7} {threads:3d} {n:4d} | {lm:14.1f} {cm:9.1f} {cm / lm:6.2f} | {prefill:20.1f}"
                      f" {cm / prefill:14.2f}", flush=True)
            rounds = "; ".join(" ".join(f"{n}:{t[n]:.0f}/{o[n]:.0f}" for n in sequences) for t, o in zip(theirs, ours))
            print(f"{'':16} rounds (sequences: llama.cpp/ctformer): {rounds}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llama-cpp", required=True,
                        help="directory holding llama-bench, llama-batched-bench and llama-quantize")
    parser.add_argument("--bench", default="build/bench/bench_decode")
    parser.add_argument("--models", default="/tmp/ctformer_llama_cpp_models", help="where the GGUF files go")
    parser.add_argument("--formats", default="fp32,q8_0,q4_0")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per cell (the median is printed)")
    parser.add_argument("--repetitions", type=int, default=3, help="llama-bench -r")
    parser.add_argument("--long-context", action="store_true",
                        help="also decode at context 1024 (llama-bench -d 960 -n 128)")
    parser.add_argument("--batched", action="store_true",
                        help="batched decode: llama-batched-bench against bench_batched_decode")
    args = parser.parse_args()
    files = model_files(args.llama_cpp, args.models)
    if args.batched:
        batched(args, files)
        return
    print(f"{'weights':7} {'thr':>3} | {'prefill 512 tok/s: llama.cpp':>28} {'ctformer':>9} {'ratio':>6} |"
          f" {'decode tok/s: llama.cpp':>23} {'ctformer':>9} {'ratio':>6}" +
          (f" | {'decode ctx 1024: llama.cpp':>26} {'ctformer':>9} {'ratio':>6}" if args.long_context else ""),
          flush=True)
    for fmt in args.formats.split(","):
        for threads in (int(t) for t in args.threads.split(",")):
            theirs, ours = [], []
            for _ in range(args.rounds):
                mine = llama_cpp(args.llama_cpp, files[fmt], threads, args.repetitions)
                if args.long_context:
                    mine += (llama_cpp_long(args.llama_cpp, files[fmt], threads, args.repetitions),)
                theirs.append(mine)
                ours.append(ctformer(args.bench, fmt, threads, args.long_context))
            columns = len(theirs[0])
            lm = [statistics.median(x[i] for x in theirs) for i in range(columns)]
            cm = [statistics.median(x[i] for x in ours) for i in range(columns)]
            line = f"{fmt:7} {threads:3d} | {lm[0]:28.1f} {cm[0]:9.1f} {cm[0] / lm[0]:6.2f} |"
            line += f" {lm[1]:23.1f} {cm[1]:9.1f} {cm[1] / lm[1]:6.2f}"
            if args.long_context:
                line += f" | {lm[2]:26.1f} {cm[2]:9.1f} {cm[2] / lm[2]:6.2f}"
            print(line, flush=True)
            rounds = "; ".join(", ".join(f"{t[i]:.0f}/{o[i]:.0f}" for i in range(columns)) for t, o in zip(theirs, ours))
            label = "prefill, decode" + (", decode ctx 1024" if args.long_context else "")
            print(f"{'':11} rounds ({label}; llama.cpp/ctformer): {rounds}", flush=True)


if __name__ == "__main__":
    main()
