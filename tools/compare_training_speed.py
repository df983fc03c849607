#!/usr/bin/env python3
"""Training-step tokens/s: ctformer (bench_train_step) against PyTorch eager.

Runs PyTorch on the same configurations, batch shapes and thread counts as
bench/train/bench_train_step.cpp, in the same session, then the ctformer
benchmark, and prints both and the ratio. The machines are shared and
noisy, so only a ratio measured in one run means anything.

    python3 tools/compare_training_speed.py --bench build/bench/bench_train_step

Needs torch (pip install torch).
"""
import argparse
import json
import math
import subprocess
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

CONFIGS = {  # name in the benchmark: (vocab, d_model, n_layer, n_head, d_ff, batch, context, bias)
    "nanogpt_cpu": (65, 128, 4, 4, 512, 12, 64, False),
    "llmc_6_layer": (50257, 384, 6, 6, 1536, 4, 256, True),
    "gpt2_small_context_64": (50257, 768, 12, 12, 3072, 4, 64, True),
    "gpt2_small": (50257, 768, 12, 12, 3072, 4, 256, True),
}


class Block(nn.Module):
    def __init__(self, d, h, f, bias):
        super().__init__()
        self.h = h
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=bias)
        self.out = nn.Linear(d, d, bias=bias)
        self.ln2 = nn.LayerNorm(d)
        self.up = nn.Linear(d, f, bias=bias)
        self.down = nn.Linear(f, d, bias=bias)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (y.view(b, t, self.h, d // self.h).transpose(1, 2) for y in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(y.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, vocab, d, layers, h, f, context, bias):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, h, f, bias) for _ in range(layers))
        self.ln = nn.LayerNorm(d)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        logits = self.ln(x) @ self.wte.weight.T
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


def torch_tokens_per_s(name, threads, precision, seconds=4.0):
    vocab, d, layers, h, f, batch, context, bias = CONFIGS[name]
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = GPT(vocab, d, layers, h, f, context, bias)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    idx = torch.randint(0, vocab, (batch, context))
    tgt = torch.randint(0, vocab, (batch, context))

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(idx, tgt)
        loss.backward()
        opt.step()

    step()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or steps < 2:
        step()
        steps += 1
    return batch * context * steps / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bench", default="build/bench/bench_train_step")
    parser.add_argument("--filter", default="", help="benchmark_filter for bench_train_step")
    parser.add_argument("--skip-bf16-torch", action="store_true",
                        help="skip PyTorch bf16 autocast (emulated, very slow on CPUs without AVX512_BF16)")
    args = parser.parse_args()
    run = subprocess.run([args.bench, "--benchmark_format=json", f"--benchmark_filter={args.filter}"],
                         capture_output=True, text=True, check=True)
    print(f"{'configuration':24} {'prec':5} {'thr':>3} {'ctformer tok/s':>15} {'PyTorch tok/s':>14} {'ratio':>6} {'GEMM share':>10}",
          flush=True)
    for b in json.loads(run.stdout)["benchmarks"]:
        # name: train_step<nanogpt_cpu, train::fp32>/2/...
        inside = b["name"].split("<")[1].split(">")[0]
        config, precision = (s.strip() for s in inside.split(","))
        precision = "bf16" if "bf16" in precision else "fp32"
        threads = int(b["name"].split("/")[1])
        ours = b["tokens/s"]
        share = b.get("gemm_share", math.nan)
        if precision == "bf16" and args.skip_bf16_torch:
            print(f"{config:24} {precision:5} {threads:3d} {ours:15.0f} {'-':>14} {'-':>6} {share:10.2f}", flush=True)
            continue
        theirs = torch_tokens_per_s(config, threads, precision)
        print(f"{config:24} {precision:5} {threads:3d} {ours:15.0f} {theirs:14.0f} {ours / theirs:6.2f} {share:10.2f}",
              flush=True)


if __name__ == "__main__":
    main()
