#!/usr/bin/env python3
"""Checks ctformer's PEFT adapter export against peft + transformers.

Run the io_test_peft test with CTFORMER_PEFT_CHECK_DIR=DIR first: for each of
its GPT-2 and LLaMA cases it leaves DIR/<case>/base (a Hugging Face model
folder), DIR/<case>/adapter (the PEFT adapter folder ctformer wrote) and
DIR/<case>/ctformer_logits.json. This script loads the base with
transformers, the adapter with peft's PeftModel.from_pretrained, runs the same
tokens and compares the logits with ctformer's.

  CTFORMER_PEFT_CHECK_DIR=/tmp/peft build/tests/io_test_peft
  python tools/check_peft_adapter.py /tmp/peft      # needs torch, transformers, peft

Tolerance: both sides compute in fp32 with different summation orders over
a few hundred products per output; 1e-4 absolute on O(1) logits.
"""
import json
import pathlib
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


def check(case: pathlib.Path) -> float:
    reference = json.loads((case / "ctformer_logits.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(case / "base", torch_dtype=torch.float32)
    model = PeftModel.from_pretrained(base, case / "adapter")
    model.eval()
    tokens = torch.tensor(reference["tokens"]).reshape(reference["batch"], reference["length"])
    with torch.no_grad():
        logits = model(tokens).logits
    ours = torch.tensor(reference["logits"]).reshape(logits.shape)
    # The adapter must matter: without it the logits differ.
    with model.disable_adapter(), torch.no_grad():
        plain = model(tokens).logits
    assert (plain - ours).abs().max().item() > 1e-3, "the adapter changes nothing: the check would be vacuous"
    return (logits - ours).abs().max().item()


def main() -> int:
    root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/peft")
    cases = sorted(p for p in root.iterdir() if (p / "ctformer_logits.json").exists())
    if not cases:
        print(f"no cases under {root}: run io_test_peft with CTFORMER_PEFT_CHECK_DIR={root} first")
        return 2
    worst = 0.0
    for case in cases:
        difference = check(case)
        print(f"{case.name}: largest logit difference {difference:.2e}")
        worst = max(worst, difference)
    ok = worst <= 1e-4
    print("peft + transformers agree with ctformer" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
