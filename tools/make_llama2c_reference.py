#!/usr/bin/env python3
"""Reference logits for llama2.c checkpoints, from a NumPy port of
llama2.c's run.c forward (adjacent-pair RoPE, as run.c rotates), for
tests/unit/io/test_llama2c.cpp:

  tests/data/llama2c_tiny.bin             a random llama2.c checkpoint (GQA,
                                          untied classifier: negative vocab)
  tests/data/llama2c_tiny_reference.json  its logits for a token sequence
  tests/data/stories260K_reference.json   the logits of ../shared/data/
                                          stories260K/stories260K.bin (when
                                          that file is there)

  /tmp/venv-hf/bin/python tools/make_llama2c_reference.py
"""
import json
import pathlib
import struct

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
STORIES = ROOT.parent / "shared" / "data" / "stories260K" / "stories260K.bin"
TOKENS = [1, 403, 407, 261, 378, 429, 270, 259, 500, 12, 64, 2]


def read(path):
    raw = pathlib.Path(path).read_bytes()
    dim, hidden, layers, heads, kv_heads, vocab, seq = struct.unpack("<7i", raw[:28])
    shared = vocab > 0
    vocab = abs(vocab)
    f = np.frombuffer(raw[28:], dtype="<f4").astype(np.float64)
    hs = dim // heads
    kv_dim = kv_heads * hs
    at = 0

    def take(*shape):
        nonlocal at
        n = int(np.prod(shape))
        out = f[at:at + n].reshape(shape)
        at += n
        return out

    w = dict(emb=take(vocab, dim), rms_att=take(layers, dim), wq=take(layers, dim, dim),
             wk=take(layers, kv_dim, dim), wv=take(layers, kv_dim, dim), wo=take(layers, dim, dim),
             rms_ffn=take(layers, dim), w1=take(layers, hidden, dim), w2=take(layers, dim, hidden),
             w3=take(layers, hidden, dim), rms_final=take(dim))
    take(seq, hs // 2)
    take(seq, hs // 2)
    w["cls"] = w["emb"] if shared else take(vocab, dim)
    assert at == f.size, "trailing bytes"
    return dict(dim=dim, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, vocab=vocab, seq=seq), w


def rmsnorm(x, weight):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-5) * weight


def rope_adjacent(v, hs):
    # run.c: element pairs (2j, 2j+1) of each head turn by pos * 10000^(-2j/hs).
    t = v.shape[0]
    pos = np.arange(t)[:, None]
    j = np.arange(hs // 2)[None, :]
    angle = pos * (1.0 / 10000.0 ** (2.0 * j / hs))
    cos, sin = np.cos(angle), np.sin(angle)
    heads = v.reshape(t, -1, hs // 2, 2)
    a, b = heads[..., 0], heads[..., 1]
    out = np.stack([a * cos[:, None] - b * sin[:, None], a * sin[:, None] + b * cos[:, None]], axis=-1)
    return out.reshape(v.shape)


def forward(c, w, tokens):
    hs = c["dim"] // c["heads"]
    group = c["heads"] // c["kv_heads"]
    t = len(tokens)
    x = w["emb"][tokens]
    mask = np.triu(np.full((t, t), -np.inf), 1)
    for l in range(c["layers"]):
        xb = rmsnorm(x, w["rms_att"][l])
        q = rope_adjacent(xb @ w["wq"][l].T, hs).reshape(t, c["heads"], hs)
        k = rope_adjacent(xb @ w["wk"][l].T, hs).reshape(t, c["kv_heads"], hs)
        v = (xb @ w["wv"][l].T).reshape(t, c["kv_heads"], hs)
        out = np.empty_like(q)
        for h in range(c["heads"]):
            scores = q[:, h] @ k[:, h // group].T / np.sqrt(hs) + mask
            p = np.exp(scores - scores.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            out[:, h] = p @ v[:, h // group]
        x = x + out.reshape(t, -1) @ w["wo"][l].T
        xb = rmsnorm(x, w["rms_ffn"][l])
        gate, up = xb @ w["w1"][l].T, xb @ w["w3"][l].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ w["w2"][l].T
    return rmsnorm(x, w["rms_final"]) @ w["cls"].T


def write_tiny(path):
    dim, hidden, layers, heads, kv_heads, vocab, seq = 32, 48, 2, 4, 2, 64, 16
    hs, kv_dim = dim // heads, kv_heads * dim // heads
    rng = np.random.default_rng(3)
    parts = [rng.normal(0, 0.5, (vocab, dim)), 1 + rng.normal(0, 0.1, (layers, dim)),
             rng.normal(0, 0.2, (layers, dim, dim)), rng.normal(0, 0.2, (layers, kv_dim, dim)),
             rng.normal(0, 0.2, (layers, kv_dim, dim)), rng.normal(0, 0.2, (layers, dim, dim)),
             1 + rng.normal(0, 0.1, (layers, dim)), rng.normal(0, 0.2, (layers, hidden, dim)),
             rng.normal(0, 0.2, (layers, dim, hidden)), rng.normal(0, 0.2, (layers, hidden, dim)),
             1 + rng.normal(0, 0.1, (dim,)), np.zeros((seq, hs // 2)), np.zeros((seq, hs // 2)),
             rng.normal(0, 0.5, (vocab, dim))]
    with open(path, "wb") as out:
        out.write(struct.pack("<7i", dim, hidden, layers, heads, kv_heads, -vocab, seq))
        for p in parts:
            out.write(np.asarray(p, dtype="<f4").tobytes())


def reference(checkpoint, tokens, target):
    c, w = read(checkpoint)
    logits = forward(c, w, tokens)
    target.write_text(json.dumps({"tokens": tokens, "vocab": c["vocab"], "logits": [float(v) for v in logits.flatten()]}))
    print(target.name, c, "argmax", logits.argmax(axis=1).tolist())


def permute_to_halves(wq, heads):
    # Hugging Face's convert_llama_weights_to_hf: adjacent pairs to halves.
    rows, cols = wq.shape
    return wq.reshape(heads, rows // heads // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def check_with_transformers(checkpoint, tokens):
    """The run.c port against transformers' LlamaForCausalLM of the same
    weights, q and k permuted as Hugging Face's converter does."""
    try:
        import torch
        import transformers
    except ImportError:
        print("transformers is not installed: the cross-check is skipped")
        return
    c, w = read(checkpoint)
    config = transformers.LlamaConfig(
        vocab_size=c["vocab"], hidden_size=c["dim"], intermediate_size=c["hidden"], num_hidden_layers=c["layers"],
        num_attention_heads=c["heads"], num_key_value_heads=c["kv_heads"], max_position_embeddings=c["seq"],
        rms_norm_eps=1e-5, tie_word_embeddings=w["cls"] is w["emb"])
    model = transformers.LlamaForCausalLM(config).eval().double()
    t = lambda a: torch.tensor(np.ascontiguousarray(a), dtype=torch.float64)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(t(w["emb"]))
        for l, layer in enumerate(model.model.layers):
            layer.input_layernorm.weight.copy_(t(w["rms_att"][l]))
            layer.self_attn.q_proj.weight.copy_(t(permute_to_halves(w["wq"][l], c["heads"])))
            layer.self_attn.k_proj.weight.copy_(t(permute_to_halves(w["wk"][l], c["kv_heads"])))
            layer.self_attn.v_proj.weight.copy_(t(w["wv"][l]))
            layer.self_attn.o_proj.weight.copy_(t(w["wo"][l]))
            layer.post_attention_layernorm.weight.copy_(t(w["rms_ffn"][l]))
            layer.mlp.gate_proj.weight.copy_(t(w["w1"][l]))
            layer.mlp.down_proj.weight.copy_(t(w["w2"][l]))
            layer.mlp.up_proj.weight.copy_(t(w["w3"][l]))
        model.model.norm.weight.copy_(t(w["rms_final"]))
        model.lm_head.weight.copy_(t(w["cls"]))
        hf = model(torch.tensor([tokens])).logits[0].numpy()
    ours = forward(c, w, tokens)
    error = np.abs(hf - ours).max() / np.abs(ours).max()
    print(f"{checkpoint.name}: run.c port against transformers: {error:.1e} of the logits' scale")
    # transformers computes the RoPE angles in float32: agreement to about 1e-7.
    assert error < 1e-5


def main():
    write_tiny(DATA / "llama2c_tiny.bin")
    reference(DATA / "llama2c_tiny.bin", [t % 64 for t in TOKENS], DATA / "llama2c_tiny_reference.json")
    check_with_transformers(DATA / "llama2c_tiny.bin", [t % 64 for t in TOKENS])
    if STORIES.exists():
        reference(STORIES, TOKENS, DATA / "stories260K_reference.json")
        check_with_transformers(STORIES, TOKENS)
    else:
        print(f"{STORIES} is not here: stories260K_reference.json not written")


if __name__ == "__main__":
    main()
