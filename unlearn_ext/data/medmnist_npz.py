"""OrganAMNIST from medmnist's ``organamnist.npz`` (``train_images``/``train_labels``, ``val_*``, ``test_*``),
read with ``allow_pickle=False``. The val split is not used: train is D, test is D_t."""
from __future__ import annotations

import zipfile
import zlib
from typing import Optional

import numpy as np

from .checks import int_labels, same_count
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
        npz = np.load(path, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise ValueError(f"{path}: a single .npy array, not the .npz archive medmnist writes")
        with npz:
            arrays = {k: npz[k] for k in ("train_images", "train_labels", "test_images", "test_labels")}
    except KeyError as e:
        raise ValueError(f"{path}: medmnist .npz lacks {e}") from None
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: corrupt or truncated .npz ({type(e).__name__}: {e})") from None
    split_xy = []
    for split in ("train", "test"):
        x = arrays[f"{split}_images"]
        if x.dtype != np.uint8 or x.ndim not in (3, 4):
            raise ValueError(f"{path}: {split}_images is {x.dtype}{x.shape}, expected uint8 N×H×W[×C]")
        y = int_labels(f"{path} ({split}_labels)", arrays[f"{split}_labels"], 0, 10)
        same_count(f"{path} ({split}_images / {split}_labels)", len(x), len(y))
        # medmnist stores N×H×W (grey) or N×H×W×C (colour); make it channels-first.
        split_xy += [x[:, None] if x.ndim == 3 else np.ascontiguousarray(x.transpose(0, 3, 1, 2)), y]
    return finish_splits("organamnist", *split_xy, num_classes=11, source=str(path), files=[str(path)], **kw)
