#!/usr/bin/env python3
"""Data-parallel training tokens/s: ctformer (bench_data_parallel under
mpirun) against PyTorch DDP with the gloo backend, same ranks, shapes,
threads and global batch, alternating in one run.

For each rank count it runs ctformer, then PyTorch, and prints both with the
ratio; a single process with 2 threads (ctformer's and PyTorch's) is the
row the 2-rank figures are judged against.

    python3 tools/compare_data_parallel.py --bench build/bench/bench_data_parallel --ranks 1,2,4

Needs torch (pip install torch) and Open MPI's mpirun.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_training_speed import GPT  # noqa: E402  (the same PyTorch model as the one-process comparison)

SHAPES = {  # benchmark name: (vocab, d_model, n_layer, n_head, d_ff, global batch, context, bias, timed steps)
    "nanogpt_cpu": (65, 128, 4, 4, 512, 12, 64, False, 40),
    "gpt2_small": (50257, 768, 12, 12, 3072, 4, 64, True, 4),
}


def ddp_worker(rank, ranks, shape, threads, port, result):
    vocab, d, layers, h, f, global_batch, context, bias, steps = SHAPES[shape]
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=ranks)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(GPT(vocab, d, layers, h, f, context, bias))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    batch = global_batch // ranks
    idx = torch.randint(0, vocab, (batch, context))
    tgt = torch.randint(0, vocab, (batch, context))

    def step():
        opt.zero_grad(set_to_none=True)
        model(idx, tgt).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    step()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    dist.barrier()
    if rank == 0:
        result.value = global_batch * context * steps / (time.perf_counter() - start)
    dist.destroy_process_group()


def torch_tokens_per_s(shape, ranks, threads, port):
    result = mp.get_context("spawn").Value("d", 0.0)
    mp.spawn(ddp_worker, args=(ranks, shape, threads, port, result), nprocs=ranks, join=True)
    return result.value


def ctformer_rows(bench, ranks, shape, threads):
    """The benchmark's rows for these ranks and threads: {zero_1 (0 or 1): row}."""
    command = [bench, "--benchmark_format=json", f"--benchmark_filter=data_parallel_step<{shape}>/threads:{threads}/"]
    if ranks > 1:
        command = ["mpirun", "-np", str(ranks), "--oversubscribe", "--bind-to", "none"] + command
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_btl="self,vader", OMPI_MCA_btl_vader_single_copy_mechanism="cma")
    out = subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout
    rows = [b for b in json.loads(out[out.index("{"):])["benchmarks"] if "error_occurred" not in b]
    return {int("zero_1:1" in b["name"]): b for b in rows}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bench", default="build/bench/bench_data_parallel")
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--shapes", default="nanogpt_cpu,gpt2_small")
    args = parser.parse_args()
    print(f"{'shape':12} {'ranks':>5} {'thr':>3} {'ctformer tok/s':>15} {'ZeRO-1 tok/s':>13} {'DDP tok/s':>10} "
          f"{'ratio':>6} {'ZeRO-1 ratio':>12} {'grad MB':>8} {'comm share':>10} {'ZeRO-1 comm':>11}", flush=True)
    port = 29500
    for shape in args.shapes.split(","):
        for ranks in map(int, args.ranks.split(",")):
            for threads in ([1, 2] if ranks == 1 else [1]):
                ours = ctformer_rows(args.bench, ranks, shape, threads)
                port += 1
                theirs = torch_tokens_per_s(shape, ranks, threads, port)
                if 0 not in ours or 1 not in ours:
                    print(f"{shape:12} {ranks:5} {threads:3} {'skipped':>15} {'':>13} {theirs:10.0f}", flush=True)
                    continue
                plain, zero = ours[0], ours[1]
                print(f"{shape:12} {ranks:5} {threads:3} {plain['tokens/s']:15.0f} {zero['tokens/s']:13.0f} "
                      f"{theirs:10.0f} {plain['tokens/s'] / theirs:6.2f} {zero['tokens/s'] / theirs:12.2f} "
                      f"{plain['allreduce_MB']:8.1f} {plain['comm_share']:10.3f} {zero['comm_share']:11.3f}",
                      flush=True)


if __name__ == "__main__":
    main()
