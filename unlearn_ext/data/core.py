"""Data plumbing shared by every data set: samples carry their training-set id, forget sets are chosen
by seed, and loaders yield ``(x, y, sample_id)`` batches."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset

Tensor = torch.Tensor


class IndexedTensorDataset(Dataset):
    """In-memory samples ``x`` (float) and labels ``y`` (int64); item i is ``(x[i], y[i], ids[i])``."""

    def __init__(self, x: Tensor, y: Tensor, ids: Optional[Tensor] = None):
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
        self.x, self.y = x, y.long()
        self.ids = torch.arange(len(x), dtype=torch.int64) if ids is None else ids.long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i], self.ids[i]

    def subset(self, positions: Tensor) -> "IndexedTensorDataset":
        return IndexedTensorDataset(self.x[positions], self.y[positions], self.ids[positions])


@dataclass
class DataSplits:
    """A data set ready for unlearning experiments: ``train`` ids are 0..len(train)-1."""

    name: str
    train: IndexedTensorDataset
    test: IndexedTensorDataset
    num_classes: int
    input_shape: Tuple[int, ...]
    source: str = ""
    notes: dict = field(default_factory=dict)


def forget_ids(train: IndexedTensorDataset, *, ratio: Optional[float] = None, cls: Optional[int] = None,
               seed: int = 0) -> Tensor:
    """Sorted ids of a forget set: a seeded random ``ratio`` of the training set, or every sample of class
    ``cls`` (exactly one of the two)."""
    if (ratio is None) == (cls is None):
        raise ValueError("give exactly one of ratio= (random forget set) or cls= (whole class)")
    if cls is not None:
        ids = train.ids[train.y == int(cls)]
        if ids.numel() == 0:
            raise ValueError(f"cls={cls}: no training sample has that label")
        return torch.sort(ids).values
    if not 0.0 < float(ratio) < 1.0:
        raise ValueError(f"ratio must be in (0, 1), got {ratio}")
    n = len(train)
    count = max(1, round(float(ratio) * n))
    g = torch.Generator().manual_seed(int(seed))
    return torch.sort(train.ids[torch.randperm(n, generator=g)[:count]]).values


def split_forget(train: IndexedTensorDataset, ids: Tensor) -> Tuple[IndexedTensorDataset, IndexedTensorDataset]:
    """(forget, retain) subsets of ``train`` for the given forget ids; unknown ids or an empty set raise."""
    ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
    if ids.numel() == 0:
        raise ValueError("the forget set is empty")
    is_forget = torch.isin(train.ids, ids)
    found = int(is_forget.sum())
    if found != torch.unique(ids).numel():
        missing = ids[~torch.isin(ids, train.ids)][:5].tolist()
        raise ValueError(f"forget ids not in the training set, e.g. {missing}")
    return train.subset(is_forget.nonzero().view(-1)), train.subset((~is_forget).nonzero().view(-1))


def loader(ds: Dataset, batch_size: int = 128, shuffle: bool = False, seed: int = 0,
           drop_last: bool = False) -> DataLoader:
    """A single-process DataLoader (in-memory data needs no workers) with a seeded shuffle order."""
    g = torch.Generator().manual_seed(int(seed)) if shuffle else None
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g, drop_last=drop_last)
