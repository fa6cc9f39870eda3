"""MedMNIST 2-D data sets (OrganAMNIST among them) through the ``medmnist`` package: its ``INFO`` gives the
class names, channels and download address, and its dataset class reads the user's ``root/<flag>.npz`` with
``download=False`` (the download host may be unreachable). The archive's structure is checked before medmnist
opens it and what medmnist read is checked after, so a missing, corrupt or wrong file is an error naming it.
medmnist loads the arrays with numpy's ``allow_pickle=False``: a pickled member is refused, never unpickled.
The val split is not used: train is D, test is D_t."""
from __future__ import annotations

import zipfile
import zlib
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from .checks import int_labels, same_count
from .core import DataSplits
from .finish import finish_splits
from .root import PathLike, data_root

_SPLITS = ("train", "test")


def _medmnist_class(flag: str):
    """medmnist's ``INFO`` entry and dataset class for ``flag``; only 2-D single-label sets load here."""
    import medmnist  # here, not at import time: it loads pandas and scikit-learn, and creates ~/.medmnist
    from medmnist.dataset import MedMNIST2D

    supported = {name: info for name, info in medmnist.INFO.items()
                 if "multi-label" not in info["task"]
                 and issubclass(getattr(medmnist, info["python_class"]), MedMNIST2D)}
    if flag not in supported:
        raise ValueError(f"flag={flag!r} is not a 2-D single-label MedMNIST data set; one of {sorted(supported)}")
    return supported[flag], getattr(medmnist, supported[flag]["python_class"])


def _check_archive(path: Path) -> None:
    """``path`` is a zip archive with the train and test arrays (read from its directory, nothing inflated)."""
    with open(path, "rb") as f:
        if f.read(6) == b"\x93NUMPY":
            raise ValueError(f"{path}: a single .npy array, not the .npz archive medmnist writes")
    try:
        with zipfile.ZipFile(path) as archive:
            members = set(archive.namelist())
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{path}: corrupt or truncated .npz ({type(e).__name__}: {e})") from None
    missing = [f"{s}_{kind}" for s in _SPLITS for kind in ("images", "labels") if f"{s}_{kind}.npy" not in members]
    if missing:
        raise ValueError(f"{path}: medmnist .npz lacks {', '.join(missing)}")


def _read_split(dataset_class, info: dict, path: Path, split: str) -> Tuple[np.ndarray, np.ndarray]:
    """One split through medmnist's dataset class: images N×C×H×W uint8 and labels N int64, checked."""
    try:
        ds = dataset_class(split=split, root=str(path.parent), download=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: corrupt or truncated .npz ({type(e).__name__}: {e})") from None
    channels = info["n_channels"]
    pixels = (ds.size, ds.size) if channels == 1 else (ds.size, ds.size, channels)
    if ds.imgs.dtype != np.uint8 or ds.imgs.shape[1:] != pixels:
        raise ValueError(f"{path}: {split}_images is {ds.imgs.dtype}{ds.imgs.shape}, expected uint8 "
                         f"N×{'×'.join(map(str, pixels))} ({channels} channel(s) per medmnist's INFO)")
    labels = int_labels(f"{path} ({split}_labels)", ds.labels, 0, len(info["label"]) - 1)
    same_count(f"{path} ({split}_images / {split}_labels)", len(ds.imgs), len(labels))
    # medmnist stores N×H×W (grey) or N×H×W×C (colour); make it channels-first.
    images = ds.imgs[:, None] if channels == 1 else np.ascontiguousarray(ds.imgs.transpose(0, 3, 1, 2))
    return images, labels


def load_medmnist(flag: str, root: Optional[PathLike] = None, **kw) -> DataSplits:
    """A 2-D single-label MedMNIST data set (28×28) from medmnist's ``root/<flag>.npz``.

    ``kw``: ``train_size``, ``test_size``, ``seed``, ``normalize`` (see :func:`load_dataset`).
    ``notes["class_names"]`` holds medmnist's names of the labels 0..K-1.
    """
    info, dataset_class = _medmnist_class(flag)
    path = data_root(root) / f"{flag}.npz"
    if not path.is_file():
        raise FileNotFoundError(
            f"{flag}: expected {path}.\nDownload {flag}.npz from {info['url']} (MD5 {info['MD5']}), or once with "
            f"internet: medmnist.{info['python_class']}(split='train', download=True, root={str(path.parent)!r}).")
    _check_archive(path)
    arrays = [a for split in _SPLITS for a in _read_split(dataset_class, info, path, split)]
    class_names = [info["label"][str(i)] for i in range(len(info["label"]))]
    return finish_splits(flag, *arrays, num_classes=len(class_names), source=str(path), files=[str(path)],
                         notes={"class_names": class_names}, **kw)


def load_organamnist(root: Optional[PathLike] = None, **kw) -> DataSplits:
    """OrganAMNIST (11 abdominal organs, 1×28×28 CT slices) from ``root/organamnist.npz``."""
    return load_medmnist("organamnist", root, **kw)
