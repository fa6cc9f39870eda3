"""The validation half: calibration may read D_f, D_r and a fixed, seeded half of the test split;
test accuracy and the membership attacks' non-members are the other half, which nothing tunes on."""
from __future__ import annotations

from typing import Tuple

import torch

from ..data import IndexedTensorDataset

#: Added to the run's seed for the split's generator, so the split does not reuse the forget set's draw.
_SPLIT_SEED_OFFSET = 7919


def validation_split(test: IndexedTensorDataset, seed: int) -> Tuple[IndexedTensorDataset, IndexedTensorDataset]:
    """``(validation, reported_test)``: a seeded random half of ``test`` (⌊n/2⌋ samples) and the rest, disjoint,
    each in the original order. The same ``seed`` gives the same halves."""
    n = len(test)
    if n < 2:
        raise ValueError(f"the test split has {n} sample(s): it cannot be halved into validation and test")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed) + _SPLIT_SEED_OFFSET))
    half = n // 2
    return test.subset(perm[:half].sort().values), test.subset(perm[half:].sort().values)
