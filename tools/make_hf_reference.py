#!/usr/bin/env python3
"""Writes tests/data/hf/: tiny random-weight Hugging Face models saved with
transformers' save_pretrained, and the logits transformers gives them, for
tests/unit/io/test_hugging_face.cpp.

  gpt2_tiny/        GPT2LMHeadModel, one model.safetensors (fp32)
  gpt2_tiny_bf16/   the same weights saved in bfloat16 (logits of the
                    bf16-rounded weights computed in fp32)
  llama_tiny/       LlamaForCausalLM, GQA, untied head, sharded into several
                    model-0000N-of-0000M.safetensors with their index

Each folder's reference.json holds the input ids and the logits (T x V, row
major). The shapes must equal the configurations in the test.

Needs torch and transformers (PyPI):
  python3 -m venv /tmp/venv-hf && /tmp/venv-hf/bin/pip install torch transformers safetensors
  /tmp/venv-hf/bin/python tools/make_hf_reference.py
"""
import json
import pathlib

import torch
import transformers

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "data" / "hf"
TOKENS = [3, 17, 95, 0, 42, 42, 7, 64, 1, 88, 23, 50]


def perturb(model, seed):
    # Default inits leave norms at 1 and biases at 0; move every parameter so
    # that a weight loaded into the wrong place changes the logits.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def write(name, model, **save_options):
    folder = OUT / name
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*"):
        old.unlink()
    model.save_pretrained(folder, safe_serialization=True, **save_options)
    reloaded = type(model).from_pretrained(folder, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = reloaded(torch.tensor([TOKENS])).logits[0].to(torch.float64)
    (folder / "reference.json").write_text(
        json.dumps({"tokens": TOKENS, "vocab": int(logits.shape[1]), "logits": [float(x) for x in logits.flatten()]})
    )
    print(name, sorted(p.name for p in folder.iterdir()))


def main():
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                activation_function="gelu_new", layer_norm_epsilon=1e-5)).eval()
    perturb(gpt2, 1)
    write("gpt2_tiny", gpt2)
    write("gpt2_tiny_bf16", gpt2.to(torch.bfloat16))

    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                 rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)).eval()
    perturb(llama, 2)
    write("llama_tiny", llama, max_shard_size="40KB")


if __name__ == "__main__":
    main()
