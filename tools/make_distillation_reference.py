#!/usr/bin/env python3
"""Writes tests/data/distillation_reference.json: PyTorch's distillation loss
and its gradient for random student and teacher logits, the reference of
tests/unit/ops/test_distillation.cpp.

loss = alpha * cross_entropy(student, targets) + (1 - alpha) * T^2 *
       mean over counted rows of KL(softmax(teacher / T) || softmax(student / T)),
rows whose target is -1 not counted (ignore_index), as Hinton et al. and
most distillation code (DistilBERT's, for one) write it.

    python3 tools/make_distillation_reference.py tests/data/distillation_reference.json
"""
import json
import sys

import torch
import torch.nn.functional as F


def case(rows, vocab, alpha, temperature, seed):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 3).requires_grad_()
    teacher = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 3
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[1] = -1  # an ignored position
    counted = targets >= 0
    ce = F.cross_entropy(student, targets, ignore_index=-1, reduction="mean")
    kl = F.kl_div(F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1),
                  log_target=True, reduction="none").sum(-1)
    loss = alpha * ce + (1 - alpha) * temperature ** 2 * kl[counted].mean()
    loss.backward()
    return {"rows": rows, "vocab": vocab, "alpha": alpha, "temperature": temperature,
            "student": student.detach().flatten().tolist(), "teacher": teacher.flatten().tolist(),
            "targets": targets.tolist(), "loss": loss.item(), "gradient": student.grad.flatten().tolist()}


def main():
    cases = [case(5, 11, 0.3, 2.0, 1), case(4, 70, 0.0, 4.0, 2), case(6, 37, 1.0, 1.0, 3), case(3, 129, 0.5, 0.7, 4)]
    with open(sys.argv[1], "w") as out:
        json.dump({"generator": "tools/make_distillation_reference.py", "torch": torch.__version__, "cases": cases},
                  out)


if __name__ == "__main__":
    main()
