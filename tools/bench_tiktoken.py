#!/usr/bin/env python3
"""tiktoken's GPT-2 encode_ordinary on one thread, in MB/s of text: the
baseline bench/io/bench_bpe_encode.cpp is compared with. The encoding is built
from the repository's data/gpt2 files (as tools/make_bpe_reference.py does).

    /tmp/venv-tok/bin/pip install tiktoken numpy
    /tmp/venv-tok/bin/python tools/bench_tiktoken.py [--file data/tinyshakespeare.txt] [--repeats 10]

encode_ordinary runs tiktoken's Rust core on the calling thread (only the
*_batch calls use a thread pool). Each pass is timed on its own; the best and
the median are printed.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_bpe_reference import gpt2_encoding  # noqa: E402


def main():
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--file", default=os.path.join(root, "data", "tinyshakespeare.txt"))
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()

    enc = gpt2_encoding(root)
    with open(args.file, "rb") as f:
        data = f.read()
    text = data.decode("utf-8")
    tokens = len(enc.encode_ordinary(text))  # warm-up
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        enc.encode_ordinary(text)
        seconds.append(time.perf_counter() - start)
    mb = len(data) / 1e6
    best, median = min(seconds), statistics.median(seconds)
    print(f"tiktoken {enc.name} encode_ordinary, 1 thread: {len(data)} bytes, {tokens} tokens")
    print(f"  best   {mb / best:8.2f} MB/s  {tokens / best / 1e6:6.3f} M tokens/s")
    print(f"  median {mb / median:8.2f} MB/s  {tokens / median / 1e6:6.3f} M tokens/s")


if __name__ == "__main__":
    main()
