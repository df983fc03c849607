#!/usr/bin/env python3
"""Checks that the Hugging Face folders ctformer writes open in transformers
and give the logits of the folders they came from: runs the test that
exports them (io_test_hugging_face, with CTFORMER_HF_EXPORT_DIR set), loads
each export with from_pretrained and compares its logits with the source
folder's reference.json (tests/data/hf/, written by make_hf_reference.py).

  /tmp/venv-hf/bin/python tools/check_hf_export.py build/tests/io_test_hugging_face
"""
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import torch
import transformers

ROOT = pathlib.Path(__file__).resolve().parent.parent


def main():
    test = sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "build" / "tests" / "io_test_hugging_face")
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([test, "save_hugging_face*"], check=True, env={**os.environ, "CTFORMER_HF_EXPORT_DIR": out},
                       stdout=subprocess.DEVNULL)
        worst = 0.0
        for folder in sorted(pathlib.Path(out).iterdir()):
            reference = json.loads((ROOT / "tests" / "data" / "hf" / folder.name / "reference.json").read_text())
            model = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
            with torch.no_grad():
                logits = model(torch.tensor([reference["tokens"]])).logits[0].to(torch.float64).flatten()
            expected = torch.tensor(reference["logits"], dtype=torch.float64)
            error = float((logits - expected).abs().max() / expected.abs().max())
            worst = max(worst, error)
            print(f"{folder.name}: {type(model).__name__} from ctformer's export, logits within {error:.2e} of scale")
        # Both sides fp32 from the same weights: only summation order differs.
        if worst > 1e-5:
            sys.exit(f"check_hf_export: logits differ by {worst:.2e} of their scale (allowed 1e-5)")


if __name__ == "__main__":
    main()
