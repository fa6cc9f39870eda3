"""One forward pass over a loader, kept per sample: the raw material of every accuracy and MIA metric."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class SampleOutputs:
    """Per-sample model outputs over a loader, in loader order (all on the CPU).

    Definitions, with p = softmax(logits) and y the sample's label (natural logarithms):

    * ``loss``       = −log p_y (cross-entropy of the sample)
    * ``confidence`` = p_y (softmax probability of the true label; SalUn's "confidence")
    * ``entropy``    = −Σ_k p_k log p_k (entropy of the predictive distribution; label-free)
    * ``correct``    = [argmax_k p_k == y]
    """

    logits: torch.Tensor  # (N, K) float32
    labels: torch.Tensor  # (N,) int64
    ids: torch.Tensor  # (N,) int64, the loader's sample ids (-1 when the loader yields none)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def log_probs(self) -> torch.Tensor:
        return F.log_softmax(self.logits.double(), dim=1)  # float64: losses near 0 keep their resolution

    @property
    def loss(self) -> torch.Tensor:
        return -self.log_probs.gather(1, self.labels[:, None]).squeeze(1)

    @property
    def confidence(self) -> torch.Tensor:
        return torch.exp(-self.loss)

    @property
    def entropy(self) -> torch.Tensor:
        logp = self.log_probs
        return -(logp.exp() * logp).sum(dim=1)

    @property
    def correct(self) -> torch.Tensor:
        return self.logits.argmax(dim=1) == self.labels


@torch.no_grad()
def collect_outputs(model: nn.Module, loader, device: Optional[torch.device] = None, *,
                    what: str = "the loader") -> SampleOutputs:
    """Run ``model`` in eval mode over ``loader`` (batches ``(x, y[, sample_id])``) and keep every sample's
    logits, label and id. The model's train/eval mode is restored afterwards. An empty loader is a
    ``ValueError`` naming it (``what``)."""
    if device is None:
        device = next(iter(model.parameters()), torch.empty(0)).device
    was_training = model.training
    model.eval()
    logits, labels, ids = [], [], []
    try:
        for batch in loader:
            x, y = batch[0], batch[1]
            logits.append(model(x.to(device)).float().cpu())
            labels.append(torch.as_tensor(y).long().cpu())
            ids.append(torch.as_tensor(batch[2]).long().cpu() if len(batch) > 2 else torch.full_like(labels[-1], -1))
    finally:
        model.train(was_training)
    if not labels:
        raise ValueError(f"{what} yielded no samples")
    return SampleOutputs(torch.cat(logits), torch.cat(labels), torch.cat(ids))
