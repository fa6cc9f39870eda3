"""Accuracy on the retain, forget and test sets (docs/protocol.md#accuracy)."""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from .outputs import SampleOutputs, collect_outputs


def accuracy(model: nn.Module, loader, device: Optional[torch.device] = None, *, what: str = "the loader") -> float:
    """Top-1 accuracy: (number of samples with argmax logit == label) / (number of samples), in eval mode (the
    model's mode restored afterwards). A loader that yields no sample has none: ``ValueError`` naming it
    (``what``)."""
    return accuracy_of(collect_outputs(model, loader, device, what=what))


def accuracy_of(outputs: SampleOutputs) -> float:
    """Top-1 accuracy of already collected outputs."""
    return float(outputs.correct.double().mean())


def unlearning_accuracies(model: nn.Module, *, forget, retain, test,
                          device: Optional[torch.device] = None) -> Dict[str, float]:
    """``RA`` = accuracy on D_r, ``FA`` = accuracy on D_f, ``TA`` = accuracy on D_t, ``UA`` = 1 − FA
    (unlearning accuracy as in SalUn). All fractions in [0, 1]."""
    fa = accuracy(model, forget, device)
    return {"RA": accuracy(model, retain, device), "FA": fa, "TA": accuracy(model, test, device), "UA": 1.0 - fa}
