"""What every loader does last: check that train and test images match, subsample (seeded), convert to float32
[0, 1] channels first, optionally standardise with the training set's statistics; ids 0..n-1."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from .core import DataSplits, IndexedTensorDataset


def _subsample(n: int, size: Optional[int], seed: int) -> Optional[np.ndarray]:
    """Sorted positions of a seeded random subset of ``size`` out of ``n`` (None: keep everything)."""
    if size is None or size >= n:
        return None
    if size < 1:
        raise ValueError(f"subsample size must be >= 1, got {size}")
    g = torch.Generator().manual_seed(int(seed))
    return np.sort(torch.randperm(n, generator=g)[:size].numpy())


def _to_float(x) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1]; float images (digits) are already scaled. Always a fresh,
    writable copy (idx arrays are read-only views of the file's bytes)."""
    arr = np.asarray(x)
    out = torch.from_numpy(arr.astype(np.float32))
    return out.div_(255.0) if arr.dtype == np.uint8 else out


def finish_splits(name: str, train_x, train_y, test_x, test_y, *, num_classes: int, source: str,
                  files: Sequence[str] = (), train_size: Optional[int] = None, test_size: Optional[int] = None,
                  seed: int = 0, normalize: bool = False, notes: Optional[dict] = None) -> DataSplits:
    """Subsample (seeded), convert to float32 [0, 1], optionally standardise; ids 0..n-1.

    ``*_x``: N×C×H×W images; ``*_y``: int64 labels the reader has checked (in range, one per image). Train
    and test images must have the same C×H×W; ``files`` are named when they do not.
    """
    if train_x.shape[1:] != test_x.shape[1:] or 0 in train_x.shape[1:]:
        raise ValueError(f"{name}: train images of shape {tuple(train_x.shape[1:])} and test images of shape "
                         f"{tuple(test_x.shape[1:])} must be the same, non-empty size ({', '.join(files)})")
    out_notes = dict(notes or {}, files=list(files))
    parts = []
    for split, x, y, size, s in (("train", train_x, train_y, train_size, seed),
                                 ("test", test_x, test_y, test_size, seed + 1)):
        keep = _subsample(len(y), size, s)
        if keep is not None:
            x, y = x[keep], y[keep]
            out_notes[f"{split}_subsample"] = {"size": int(size), "seed": int(s)}
        parts.append((_to_float(x), torch.from_numpy(np.ascontiguousarray(y))))
    (xtr, ytr), (xte, yte) = parts
    if normalize:
        # Statistics of the training set only, so D_t stays unseen.
        mean = xtr.mean(dim=(0, 2, 3), keepdim=True)
        std = xtr.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-8)
        xtr, xte = (xtr - mean) / std, (xte - mean) / std
        out_notes["normalization"] = {"mean": mean.flatten().tolist(), "std": std.flatten().tolist()}
    return DataSplits(name, IndexedTensorDataset(xtr, ytr), IndexedTensorDataset(xte, yte), num_classes,
                      tuple(xtr.shape[1:]), source=source, notes=out_notes)

