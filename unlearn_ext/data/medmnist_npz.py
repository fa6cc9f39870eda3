"""OrganAMNIST from medmnist's ``organamnist.npz`` (``train_images``/``train_labels``, ``val_*``, ``test_*``),
read with ``allow_pickle=False``. The val split is not used: train is D, test is D_t."""
from __future__ import annotations

import zipfile
import zlib
from typing import Optional

import numpy as np

from .core import DataSplits
from .finish import finish_splits
from .root import PathLike, data_root


def load_organamnist(root: Optional[PathLike] = None, **kw) -> DataSplits:
    """OrganAMNIST (11 classes, 1×28×28) from medmnist's ``root/organamnist.npz``."""
    path = data_root(root) / "organamnist.npz"
    if not path.is_file():
        raise FileNotFoundError(
            f"organamnist: expected {path}.\nDownload organamnist.npz from https://zenodo.org/records/10519652 "
            f"(MedMNIST v2), or once with internet: pip install medmnist; "
            f"medmnist.OrganAMNIST(split='train', download=True, root={str(path.parent)!r}).")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in ("train_images", "train_labels", "test_images", "test_labels")}
    except KeyError as e:
        raise ValueError(f"{path}: medmnist .npz lacks {e}") from None
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: corrupt or truncated .npz ({type(e).__name__}: {e})") from None
    split_xy = []
    for split in ("train", "test"):
        x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"].reshape(-1).astype(np.int64)
        if x.dtype != np.uint8 or x.ndim not in (3, 4) or len(x) != len(y):
            raise ValueError(f"{path}: {split}_images {x.dtype}{x.shape} / {split}_labels {y.shape} are not "
                             "uint8 N×H×W[×C] and N")
        # medmnist stores N×H×W (grey) or N×H×W×C (colour); make it channels-first.
        split_xy += [x[:, None] if x.ndim == 3 else np.ascontiguousarray(x.transpose(0, 3, 1, 2)), y]
    return finish_splits("organamnist", *split_xy, num_classes=11, source=str(path), files=[str(path)], **kw)

