#!/usr/bin/env python3
"""LoRA fine-tuning step: ctformer (bench_lora_step) against PEFT on PyTorch eager.

Runs, in one session and alternating, ctformer's benchmark and the same
steps in PyTorch: transformers' GPT-2 (the GPT-2 small shape, 4 x 128
tokens, random weights) fully fine-tuned with AdamW, and with PEFT LoRA of
rank 8 on c_attn (PEFT's usual GPT-2 target: q, k and v share one adapter;
ctformer adapts q and v, slightly less work, noted in the output), same
threads. Prints tokens/s, ratios, and the bytes of gradients plus AdamW state.

    python3 tools/compare_lora_speed.py --bench build/bench/bench_lora_step

Needs torch, transformers, peft.
"""
import argparse
import json
import subprocess
import time

import torch

BATCH, CONTEXT = 4, 128


def torch_step_rate(threads, lora, seconds=6.0):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = GPT2Config(n_positions=CONTEXT, n_embd=768, n_layer=12, n_head=12, vocab_size=50257,
                        attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    if lora:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"], lora_dropout=0.0,
                                                 fan_in_fan_out=True))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.1)
    idx = torch.randint(0, 50257, (BATCH, CONTEXT))

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=idx, labels=idx).loss
        loss.backward()
        opt.step()

    step()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or steps < 2:
        step()
        steps += 1
    rate = BATCH * CONTEXT * steps / (time.perf_counter() - start)
    count = sum(p.numel() for p in trainable)
    return rate, 3 * 4 * count / 1e6  # gradients + two AdamW moments, fp32


def ours(bench, threads):
    run = subprocess.run([bench, "--benchmark_format=json", f"--benchmark_filter=/{threads}/"],
                         capture_output=True, text=True, check=True)
    out = {}
    for b in json.loads(run.stdout)["benchmarks"]:
        kind = "lora" if "lora" in b["name"] else "full"
        out[kind] = (b["tokens/s"], b["grad_and_state_MB"])
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bench", default="build/bench/bench_lora_step")
    parser.add_argument("--threads", default="1,2")
    args = parser.parse_args()
    print("ctformer: LoRA r=8 on q, v; PEFT: r=8 on c_attn (q, k, v)")
    print(f"{'thr':>3} {'kind':5} {'ctformer tok/s':>15} {'PEFT tok/s':>11} {'ratio':>6} "
          f"{'ctformer MB':>12} {'PyTorch MB':>11}")
    for threads in (int(t) for t in args.threads.split(",")):
        mine = ours(args.bench, threads)
        theirs = {kind: torch_step_rate(threads, kind == "lora") for kind in ("full", "lora")}
        for kind in ("full", "lora"):
            (rate, mb), (t_rate, t_mb) = mine[kind], theirs[kind]
            print(f"{threads:3d} {kind:5} {rate:15.0f} {t_rate:11.0f} {rate / t_rate:6.2f} {mb:12.1f} {t_mb:11.1f}",
                  flush=True)
        print(f"{threads:3d} LoRA / full: step time {mine['full'][0] / mine['lora'][0]:.2f}x, "
              f"gradient + state bytes {mine['lora'][1] / mine['full'][1]:.2%}")


if __name__ == "__main__":
    main()
