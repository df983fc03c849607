#!/usr/bin/env python3
"""Writes tests/data/gguf_reference.gguf and gguf_reference.json with the
`gguf` package (llama.cpp's own Python GGUF writer, PyPI): metadata of every
value type, and small tensors of F32, F16, BF16, Q8_0 and Q4_0, the block
formats quantized by gguf.quants (which matches ggml's C code bit for bit).
The JSON holds what tests/unit/io/test_gguf.cpp expects: the source floats
of each tensor and the values gguf.quants dequantizes them to. It also holds,
for tests/unit/io/test_gguf_model.cpp, the q and k projections of
tests/data/hf/llama_tiny as llama.cpp's convert_hf_to_gguf.py stores them:
each head's rows reordered from Hugging Face's rotate-halves order to
llama.cpp's adjacent pairs.

    python3 tools/make_gguf_reference.py tests/data/gguf_reference
"""
import json
import struct
import sys
from pathlib import Path

import gguf
import numpy as np


def read_safetensors(path):
    raw = Path(path).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        assert t["dtype"] == "F32", t
        begin, end = t["data_offsets"]
        out[name] = np.frombuffer(raw[8 + n + begin:8 + n + end], dtype=np.float32).reshape(t["shape"])
    return out


def llama_cpp_permute(w, heads):
    """convert_hf_to_gguf.py's LlamaModel.permute: (heads, 2, rows / heads / 2, cols) halves -> pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_tiny_rope(folder):
    config = json.loads((Path(folder) / "config.json").read_text())
    weights = {}
    for shard in sorted(Path(folder).glob("model*.safetensors")):  # sharded: every shard
        weights.update(read_safetensors(shard))
    out = {}
    for layer in range(config["num_hidden_layers"]):
        h = f"model.layers.{layer}.self_attn."
        q = llama_cpp_permute(weights[h + "q_proj.weight"], config["num_attention_heads"])
        k = llama_cpp_permute(weights[h + "k_proj.weight"], config["num_key_value_heads"])
        out[f"blk.{layer}.attn_q.weight"] = [float(x) for x in q.reshape(-1)]
        out[f"blk.{layer}.attn_k.weight"] = [float(x) for x in k.reshape(-1)]
    return out


def main(stem):
    rng = np.random.default_rng(20261206)
    writer = gguf.GGUFWriter(stem + ".gguf", arch="llama")
    writer.add_uint8("test.u8", 200)
    writer.add_int8("test.i8", -100)
    writer.add_uint16("test.u16", 60000)
    writer.add_int16("test.i16", -30000)
    writer.add_uint32("test.u32", 4000000000)
    writer.add_int32("test.i32", -2000000000)
    writer.add_float32("test.f32", 0.15625)
    writer.add_bool("test.bool", True)
    writer.add_string("test.string", "héllo ▁wörld")
    writer.add_uint64("test.u64", 2**60 + 3)
    writer.add_int64("test.i64", -(2**60) - 3)
    writer.add_float64("test.f64", 2.718281828459045)
    writer.add_array("test.strings", ["a", "", "<|endoftext|>", "Ġthe"])
    writer.add_array("test.i32s", [1, -2, 3])
    writer.add_array("test.f32s", [0.5, -1.25])

    tensors = {}
    shapes = {"f32": (3, 64), "f16": (2, 32), "bf16": (2, 32), "q8_0": (4, 64), "q4_0": (4, 64)}
    types = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
             "q4_0": gguf.GGMLQuantizationType.Q4_0}
    for name, (rows, cols) in shapes.items():
        values = rng.standard_normal((rows, cols)).astype(np.float32)
        values[0, :4] = [0.0, 0.0, 0.0, 0.0]
        qtype = types[name]
        data = values if name == "f32" else gguf.quants.quantize(values, qtype)
        writer.add_tensor("tensor." + name, data, raw_dtype=None if name == "f32" else qtype)
        stored = values if name == "f32" else gguf.quants.dequantize(data, qtype)
        tensors["tensor." + name] = {
            "rows": rows, "cols": cols,
            "source": [float(x) for x in values.reshape(-1)],
            "stored": [float(x) for x in np.asarray(stored, dtype=np.float32).reshape(-1)],
        }
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with open(stem + ".json", "w") as f:
        json.dump({"gguf_package": getattr(gguf, "__version__", "unknown"), "tensors": tensors,
                   "llama_tiny_rope": llama_tiny_rope(Path(stem).parent / "hf" / "llama_tiny")}, f)


if __name__ == "__main__":
    main(sys.argv[1])
