"""SVHN (cropped digits) from ``train_32x32.mat`` / ``test_32x32.mat`` (MATLAB v5, ``X`` of shape 32×32×3×N,
``y`` N×1 with label 10 meaning digit 0) via :func:`scipy.io.loadmat`. The ``extra`` split is not used."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from .core import DataSplits
from .finish import finish_splits
from .root import PathLike, data_root


def read_svhn_mat(path: PathLike) -> Tuple[np.ndarray, np.ndarray]:
    """One SVHN cropped-digits ``.mat``: images (N, 3, 32, 32) uint8, labels (N,) with 10 mapped to 0."""
    import scipy.io

    path = Path(path)
    try:
        mat = scipy.io.loadmat(str(path))
    except Exception as e:  # scipy raises many types (MatReadError, ValueError, OSError, TypeError, ...)
        raise ValueError(f"{path}: corrupt or truncated .mat file ({type(e).__name__}: {e})") from None
    if "X" not in mat or "y" not in mat:
        raise ValueError(f"{path}: SVHN .mat lacks 'X' or 'y'")
    x, y = mat["X"], np.asarray(mat["y"]).reshape(-1).astype(np.int64)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[2] != 3 or x.shape[3] != len(y):
        raise ValueError(f"{path}: X {x.dtype}{x.shape} / y {y.shape} are not uint8 H×W×3×N and N")
    if y.size and (y.min() < 1 or y.max() > 10):
        raise ValueError(f"{path}: SVHN labels must be 1..10 (10 = digit 0), found {y.min()}..{y.max()}")
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), y % 10


def load_svhn(root: Optional[PathLike] = None, **kw) -> DataSplits:
    """SVHN (cropped digits) from ``root/svhn/{train,test}_32x32.mat`` or ``root/{train,test}_32x32.mat``
    (torchvision's layout). The ``extra`` split is not used."""
    r = data_root(root)
    for folder in (r / "svhn", r):
        paths = [folder / "train_32x32.mat", folder / "test_32x32.mat"]
        if all(p.is_file() for p in paths):
            break
    else:
        raise FileNotFoundError(
            f"svhn: expected {r / 'svhn' / 'train_32x32.mat'} and {r / 'svhn' / 'test_32x32.mat'} (or the same "
            f"names directly under {r}).\nDownload them from http://ufldl.stanford.edu/housenumbers/ "
            "(format 2, cropped digits).")
    (train_x, train_y), (test_x, test_y) = (read_svhn_mat(p) for p in paths)
    return finish_splits("svhn", train_x, train_y, test_x, test_y, num_classes=10, source=str(folder),
                   files=[str(p) for p in paths], **kw)

