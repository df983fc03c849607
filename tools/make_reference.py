#!/usr/bin/env python3
"""Writes the PyTorch reference files the model tests compare ctformer against.

For each tiny configuration below it builds the same decoder ctformer builds
(same parameter names, layout and formulas), fills it with seeded random
weights, runs one batch and records, in a safetensors file under tests/data/:

  param.<name>    the initial weights (ctformer loads these by name)
  input_tokens    (B, T) int32, and targets (B, T) int32 (-1 = ignored)
  logits          (B, T, V) float32
  loss            (1,) float32: mean cross-entropy over non-ignored targets
  grad.<name>     d loss / d parameter
  after3.<name>   the parameters after 3 AdamW steps on that batch
                  (lr 1e-2, betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on
                  matrices only: ctformer's default grouping)

Rerun (torch from PyPI: `pip install torch numpy`):

    python3 tools/make_reference.py --out tests/data

Everything is float64 inside PyTorch and stored as float32, so the
reference itself carries no float32 rounding of its own.
"""
import argparse
import json
import math
import os
import struct

import numpy as np
import torch

CONFIGS = {
    "reference_gpt": dict(vocab=17, d_model=16, n_layer=2, n_head=4, n_kv_head=4, d_ff=40, max_seq=12,
                          norm="layer_norm", activation="gelu", position="learned", bias=True, tie=True),
    "reference_llama": dict(vocab=19, d_model=16, n_layer=2, n_head=4, n_kv_head=2, d_ff=24, max_seq=12,
                            norm="rms_norm", activation="swiglu", position="rope", bias=False, tie=False,
                            rope_base=10000.0),
}
BATCH, SEQ = 3, 10
EPS = 1e-5
ADAMW = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def parameter_table(c):
    """(name, shape, kind) in ctformer's layout order (nn/model.hpp visit())."""
    d, h, kv = c["d_model"], c["n_head"], c["n_kv_head"]
    hd = d // h
    qkv = (h + 2 * kv) * hd
    up = 2 * c["d_ff"] if c["activation"] == "swiglu" else c["d_ff"]
    ln = c["norm"] == "layer_norm"
    t = [("token_embedding.weight", (c["vocab"], d), "embedding")]
    if c["position"] == "learned":
        t.append(("position_embedding.weight", (c["max_seq"], d), "embedding"))
    for layer in range(c["n_layer"]):
        p = f"blocks.{layer}."
        t.append((p + "attention_norm.weight", (d,), "norm"))
        if ln:
            t.append((p + "attention_norm.bias", (d,), "norm"))
        t.append((p + "attention.qkv.weight", (qkv, d), "matrix"))
        if c["bias"]:
            t.append((p + "attention.qkv.bias", (qkv,), "bias"))
        t.append((p + "attention.output.weight", (d, d), "matrix"))
        if c["bias"]:
            t.append((p + "attention.output.bias", (d,), "bias"))
        t.append((p + "mlp_norm.weight", (d,), "norm"))
        if ln:
            t.append((p + "mlp_norm.bias", (d,), "norm"))
        t.append((p + "mlp.up.weight", (up, d), "matrix"))
        if c["bias"]:
            t.append((p + "mlp.up.bias", (up,), "bias"))
        t.append((p + "mlp.down.weight", (d, c["d_ff"]), "matrix"))
        if c["bias"]:
            t.append((p + "mlp.down.bias", (d,), "bias"))
    t.append(("final_norm.weight", (d,), "norm"))
    if ln:
        t.append(("final_norm.bias", (d,), "norm"))
    if not c["tie"]:
        t.append(("lm_head.weight", (c["vocab"], d), "matrix"))
    return t


def norm(c, x, w, b):
    if c["norm"] == "layer_norm":
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), w, b, EPS)
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + EPS) * w


def rope(c, x):  # x: (B, T, heads, D), rotate-half form
    dim = x.shape[-1]
    half = dim // 2
    pos = torch.arange(x.shape[1], dtype=torch.float64)
    freq = c["rope_base"] ** (-2.0 * torch.arange(half, dtype=torch.float64) / dim)
    ang = pos[:, None] * freq[None, :]
    cos, sin = torch.cos(ang)[None, :, None, :], torch.sin(ang)[None, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def forward(c, P, tokens):
    B, T = tokens.shape
    d, h, kv = c["d_model"], c["n_head"], c["n_kv_head"]
    hd = d // h
    x = P["token_embedding.weight"][tokens]
    if c["position"] == "learned":
        x = x + P["position_embedding.weight"][torch.arange(T)][None]
    for layer in range(c["n_layer"]):
        p = f"blocks.{layer}."
        g = lambda n: P.get(p + n)
        a = norm(c, x, g("attention_norm.weight"), g("attention_norm.bias"))
        qkv = a @ g("attention.qkv.weight").T
        if c["bias"]:
            qkv = qkv + g("attention.qkv.bias")
        q = qkv[..., : h * hd].reshape(B, T, h, hd)
        k = qkv[..., h * hd : (h + kv) * hd].reshape(B, T, kv, hd)
        v = qkv[..., (h + kv) * hd :].reshape(B, T, kv, hd)
        if c["position"] == "rope":
            q, k = rope(c, q), rope(c, k)
        k = k.repeat_interleave(h // kv, dim=2)
        v = v.repeat_interleave(h // kv, dim=2)
        scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(hd)
        mask = torch.ones(T, T, dtype=torch.bool).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
        attn = torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v).reshape(B, T, d)
        out = attn @ g("attention.output.weight").T
        if c["bias"]:
            out = out + g("attention.output.bias")
        x = x + out
        m = norm(c, x, g("mlp_norm.weight"), g("mlp_norm.bias"))
        up = m @ g("mlp.up.weight").T
        if c["bias"]:
            up = up + g("mlp.up.bias")
        if c["activation"] == "swiglu":
            f = c["d_ff"]
            act = torch.nn.functional.silu(up[..., :f]) * up[..., f:]
        else:
            act = torch.nn.functional.gelu(up, approximate="tanh")
        down = act @ g("mlp.down.weight").T
        if c["bias"]:
            down = down + g("mlp.down.bias")
        x = x + down
    x = norm(c, x, P["final_norm.weight"], P.get("final_norm.bias"))
    head = P["token_embedding.weight"] if c["tie"] else P["lm_head.weight"]
    return x @ head.T


def write_safetensors(path, tensors, metadata):
    header, blobs, offset = {"__metadata__": metadata}, [], 0
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        dtype = {np.dtype("float32"): "F32", np.dtype("int32"): "I32"}[array.dtype]
        data = array.tobytes()
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)
    os.replace(tmp, path)


def make(name, c, out_dir):
    rng = np.random.default_rng(20261125)
    table = parameter_table(c)
    P = {}
    for pname, shape, kind in table:
        if kind == "norm":
            base = np.zeros(shape) if pname.endswith(".bias") else np.ones(shape)
            value = base + rng.uniform(-0.2, 0.2, shape)
        else:
            value = rng.normal(0.0, 0.3, shape)
        # Round to float32 first so ctformer and PyTorch start from identical weights.
        P[pname] = torch.tensor(value.astype(np.float32).astype(np.float64), requires_grad=True)
    tokens = torch.tensor(rng.integers(0, c["vocab"], (BATCH, SEQ)), dtype=torch.long)
    targets = torch.tensor(rng.integers(0, c["vocab"], (BATCH, SEQ)), dtype=torch.long)
    targets[0, :3] = -1  # ignored positions, as the addition task's prompts are
    logits = forward(c, P, tokens)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, c["vocab"]), targets.reshape(-1), ignore_index=-1)
    loss.backward()
    tensors = {"input_tokens": tokens.numpy().astype(np.int32), "targets": targets.numpy().astype(np.int32),
               "logits": logits.detach().numpy().astype(np.float32),
               "loss": np.array([loss.item()], dtype=np.float32)}
    for pname, _, _ in table:
        tensors["param." + pname] = P[pname].detach().numpy().astype(np.float32)
        tensors["grad." + pname] = P[pname].grad.numpy().astype(np.float32)
    decay = [P[n] for n, _, k in table if k == "matrix"]
    no_decay = [P[n] for n, _, k in table if k != "matrix"]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": ADAMW["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=ADAMW["lr"], betas=ADAMW["betas"], eps=ADAMW["eps"])
    for _ in range(3):
        opt.zero_grad()
        logits = forward(c, P, tokens)
        torch.nn.functional.cross_entropy(logits.reshape(-1, c["vocab"]), targets.reshape(-1),
                                          ignore_index=-1).backward()
        opt.step()
    for pname, _, _ in table:
        tensors["after3." + pname] = P[pname].detach().numpy().astype(np.float32)
    meta = {"config": json.dumps(c), "adamw": json.dumps(ADAMW), "generator": "tools/make_reference.py"}
    path = os.path.join(out_dir, name + ".safetensors")
    write_safetensors(path, tensors, meta)
    print(f"wrote {path}: loss {loss.item():.6f}, {len(table)} parameter tensors")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "data"))
    args = parser.parse_args()
    torch.set_default_dtype(torch.float64)
    os.makedirs(args.out, exist_ok=True)
    for name, c in CONFIGS.items():
        make(name, c, args.out)


if __name__ == "__main__":
    main()
