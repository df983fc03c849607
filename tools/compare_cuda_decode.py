#!/usr/bin/env python3
"""The PyTorch peer of bench_batched_decode_cuda: Hugging Face's
LlamaForCausalLM of the same shape (d_model 768, 12 layers, 12 heads of 64,
d_ff 2048, vocabulary 32000, untied head, random weights) on the same GPU, in
fp32 and bf16, eager with SDPA attention and a DynamicCache.

Prints one line per row, as the C++ benchmark names them: prefill tok/s of a
512-token prompt, and aggregate decode tok/s of 1 to 256 sequences at
contexts 128 and 1024 (each step's last-position logits copied to the host,
as the C++ forward does; the cache is cropped back to the context after each
step, so every step decodes at exactly that context).

Usage: compare_cuda_decode.py [--dtypes fp32,bf16] [--sequences 1,16,64,256]
"""
import argparse
import json
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicCache


def build(dtype):
    config = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=2048,
                         rope_theta=10000.0, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(2024)
    model = LlamaForCausalLM(config).to(device="cuda", dtype=dtype).eval()
    return model


def timed(fn, min_seconds):
    fn()
    torch.cuda.synchronize()
    runs, start = 0, time.perf_counter()
    while True:
        fn()
        runs += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds and runs >= 3:
            return elapsed / runs


@torch.inference_mode()
def prefill_rate(model, prompt=512):
    tokens = torch.randint(0, 32000, (1, prompt), device="cuda")

    def run():
        out = model(tokens, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
        out.logits.float().cpu()

    return prompt / timed(run, 0.5)


@torch.inference_mode()
def decode_rate(model, sequences, context):
    tokens = torch.randint(0, 32000, (sequences, context), device="cuda")
    cache = DynamicCache()
    model(tokens, past_key_values=cache, use_cache=True, logits_to_keep=1)
    step_tokens = torch.full((sequences, 1), 42, device="cuda", dtype=torch.long)
    position = torch.full((sequences, 1), context, device="cuda", dtype=torch.long)

    def run():
        out = model(step_tokens, past_key_values=cache, position_ids=position, use_cache=True)
        out.logits[:, -1].float().cpu()
        cache.crop(context)

    return sequences / timed(run, 0.3)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--sequences", default="1,16,64,256")
    parser.add_argument("--contexts", default="128,1024")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32, as ops::gemm's fp32 path
    for name in args.dtypes.split(","):
        model = build({"fp32": torch.float32, "bf16": torch.bfloat16}[name])
        print(json.dumps({"peer": "pytorch", "dtype": name, "row": "prefill", "tokens": 512,
                          "tok/s": round(prefill_rate(model), 1)}), flush=True)
        for context in map(int, args.contexts.split(",")):
            for sequences in map(int, args.sequences.split(",")):
                row = {"peer": "pytorch", "dtype": name, "row": "decode", "sequences": sequences, "context": context}
                try:
                    row["tok/s"] = round(decode_rate(model, sequences, context), 1)
                except Exception as error:  # one shape failing (memory, an API change) leaves the others
                    row["error"] = repr(error)
                print(json.dumps(row), flush=True)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
