"""scikit-learn's ``load_digits``: 1,797 real 8×8 handwritten digits, always present with scikit-learn."""
from __future__ import annotations

import torch

from .core import DataSplits, IndexedTensorDataset


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> DataSplits:
    """Digits scaled to [0, 1] as 1×8×8 images, split into train/test with a seeded permutation."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(x)))
    test, train = perm[:n_test], perm[n_test:]
    return DataSplits("digits", IndexedTensorDataset(x[train], y[train]),
                      IndexedTensorDataset(x[test], y[test], ids=torch.arange(n_test)), 10, (1, 8, 8),
                      source="sklearn.datasets.load_digits")
