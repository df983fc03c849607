#!/usr/bin/env python3
"""Reads a GGUF file that `quantize` wrote from a GPT-2-shaped checkpoint with
llama.cpp's own reader (the `gguf` package, PyPI) and checks it against the
quantized safetensors checkpoint `quantize` wrote from the same model:
llama.cpp's metadata keys and values, every tensor under llama.cpp's name
with ggml's shape, the linear weights' Q8_0/Q4_0 blocks byte for byte, the
embeddings and norms float for float, zero biases where the model has none,
and the tokenizer. Exits non-zero with the first difference.

    check_gguf_export.py MODEL.gguf MODEL.safetensors
"""
import json
import struct
import sys

import numpy as np

try:
    import gguf
except ImportError:
    sys.exit("check_gguf_export.py needs the gguf package (pip install gguf)")


def read_safetensors(path):
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    tensors = {name: raw[8 + n + t["data_offsets"][0]:8 + n + t["data_offsets"][1]]
               for name, t in header.items() if name != "__metadata__"}
    return header, tensors


def fail(what):
    sys.exit("check_gguf_export.py: " + what)


def main(gguf_path, checkpoint_path):
    reader = gguf.GGUFReader(gguf_path)
    header, tensors = read_safetensors(checkpoint_path)
    config = json.loads(header["__metadata__"]["config"])
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}

    expected = {
        "general.architecture": "gpt2",
        "gpt2.context_length": config["max_seq"],
        "gpt2.embedding_length": config["d_model"],
        "gpt2.block_count": config["n_layer"],
        "gpt2.feed_forward_length": config["d_ff"],
        "gpt2.attention.head_count": config["n_head"],
        "tokenizer.ggml.model": "gpt2",
    }
    for key, value in expected.items():
        if fields.get(key) != value:
            fail(f"{key} is {fields.get(key)!r}, expected {value!r}")
    if abs(fields["gpt2.attention.layer_norm_epsilon"] - config["norm_eps"]) > 1e-9:
        fail("gpt2.attention.layer_norm_epsilon differs from the configuration's norm_eps")
    if len(fields["tokenizer.ggml.tokens"]) != config["vocab"]:
        fail(f"{len(fields['tokenizer.ggml.tokens'])} tokens for a vocabulary of {config['vocab']}")

    names = {"token_embd.weight": "token_embedding.weight", "position_embd.weight": "position_embedding.weight",
             "output_norm.weight": "final_norm.weight", "output_norm.bias": "final_norm.bias",
             "output.weight": "lm_head.weight"}
    per_block = {"attn_norm.weight": "attention_norm.weight", "attn_norm.bias": "attention_norm.bias",
                 "attn_qkv.weight": "attention.qkv.weight", "attn_qkv.bias": "attention.qkv.bias",
                 "attn_output.weight": "attention.output.weight", "attn_output.bias": "attention.output.bias",
                 "ffn_norm.weight": "mlp_norm.weight", "ffn_norm.bias": "mlp_norm.bias",
                 "ffn_up.weight": "mlp.up.weight", "ffn_up.bias": "mlp.up.bias",
                 "ffn_down.weight": "mlp.down.weight", "ffn_down.bias": "mlp.down.bias"}
    for layer in range(config["n_layer"]):
        for ours, theirs in per_block.items():
            names[f"blk.{layer}.{ours}"] = f"blocks.{layer}.{theirs}"
    file_type = {7: gguf.GGMLQuantizationType.Q8_0, 2: gguf.GGMLQuantizationType.Q4_0}[fields["general.file_type"]]
    seen = set()
    for t in reader.tensors:
        if t.name not in names:
            fail(f"tensor {t.name} is not in llama.cpp's gpt2 layout")
        source = names[t.name]
        seen.add(t.name)
        stored = np.asarray(t.data).tobytes()
        if source not in tensors:
            if not t.name.endswith(".bias") or config["bias"]:
                fail(f"{t.name} has no counterpart {source} in the checkpoint")
            if np.any(np.frombuffer(stored, dtype=np.float32) != 0):
                fail(f"{t.name}: a model without biases gets zero biases")
            continue
        info = header[source]
        rows = info["shape"][0]
        if info["dtype"] == "U8":  # a packed linear weight: ggml blocks
            if t.tensor_type != file_type:
                fail(f"{t.name} is {t.tensor_type.name}, the file type says {file_type.name}")
        elif t.tensor_type != gguf.GGMLQuantizationType.F32:
            fail(f"{t.name} is {t.tensor_type.name}; embeddings, norms and biases are F32")
        if int(t.shape[-1]) != rows:  # ggml lists the innermost extent first
            fail(f"{t.name} has shape {list(t.shape)}, the checkpoint's {source} {info['shape']}")
        if stored != tensors[source]:
            fail(f"{t.name}: bytes differ from the checkpoint's {source}")
    missing = set(n for n in names if not n.startswith("output.") or "lm_head.weight" in tensors) - seen
    if missing:
        fail(f"tensors missing: {sorted(missing)}")
    print(f"check_gguf_export.py: {gguf_path}: {len(reader.tensors)} tensors, llama.cpp's keys and names, "
          f"{file_type.name} blocks equal to {checkpoint_path}'s")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
