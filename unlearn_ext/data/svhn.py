"""SVHN (cropped digits) from ``train_32x32.mat`` / ``test_32x32.mat`` (MATLAB v5, ``X`` of shape 32×32×3×N,
``y`` N×1 with label 10 meaning digit 0) via :func:`scipy.io.loadmat`. The ``extra`` split is not used."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from .checks import int_labels, same_count
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
    x = mat["X"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[2] != 3:
        raise ValueError(f"{path}: X is {x.dtype}{x.shape}, expected uint8 H×W×3×N")
    y = int_labels(f"{path} (y; 10 means digit 0)", mat["y"], 1, 10)
    same_count(str(path), x.shape[3], len(y))
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

