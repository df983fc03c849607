#!/usr/bin/env python3
"""Writes tests/data/gguf_reference.gguf and gguf_reference.json with the
`gguf` package (llama.cpp's own Python GGUF writer, PyPI): metadata of every
value type, and small tensors of F32, F16, BF16, Q8_0 and Q4_0, the block
formats quantized by gguf.quants (which matches ggml's C code bit for bit).
The JSON holds what tests/unit/io/test_gguf.cpp expects: the source floats
of each tensor and the values gguf.quants dequantizes them to.

    python3 tools/make_gguf_reference.py tests/data/gguf_reference
"""
import json
import sys

import gguf
import numpy as np


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
        json.dump({"gguf_package": getattr(gguf, "__version__", "unknown"), "tensors": tensors}, f)


if __name__ == "__main__":
    main(sys.argv[1])
