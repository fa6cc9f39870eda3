"""MNIST and Fashion-MNIST from idx files, gzipped or not (detected from the gzip magic, not the file name).
The header magic (``00 00 08 ndim``) and the sizes it declares are checked against the payload length."""
from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

from .checks import int_labels, same_count
from .core import DataSplits
from .finish import finish_splits
from .root import PathLike, data_root


#: Where the Debian package ``dataset-fashion-mnist`` installs the real Fashion-MNIST files.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

_IDX_FILES = {"train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
              "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte"}


def read_idx(path: PathLike, ndim: int) -> np.ndarray:
    """One idx file (gzipped or raw) as a uint8 array of ``ndim`` dimensions, the shape its header declares.

    Only the unsigned-byte type (``0x08``, used by MNIST and Fashion-MNIST) is accepted. A bad magic, another
    number of dimensions, a corrupt gzip stream or a payload whose length differs from the declared sizes
    raises ``ValueError`` naming the file.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: corrupt or truncated gzip stream ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an idx file (bad magic {raw[:4].hex()})")
    if raw[2] != 0x08:
        raise ValueError(f"{path}: idx data type 0x{raw[2]:02x} is not unsigned byte (0x08)")
    if raw[3] != ndim:
        raise ValueError(f"{path}: idx header declares {raw[3]} dimensions, expected {ndim}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated idx header")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + math.prod(shape)  # Python ints: a huge declared size cannot overflow
    if len(raw) != expected:
        raise ValueError(f"{path}: idx header declares shape {shape} ({expected} bytes) but the file holds "
                         f"{len(raw)} bytes (truncated or corrupt)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find_idx_dir(candidates: Sequence[Path], dataset: str, how: str) -> Dict[str, Path]:
    """The four idx files from the first candidate folder that holds all of them (raw preferred over .gz)."""
    for folder in candidates:
        found = {}
        for key, stem in _IDX_FILES.items():
            for name in (stem, stem + ".gz"):
                if (folder / name).is_file():
                    found[key] = folder / name
                    break
        if len(found) == len(_IDX_FILES):
            return found
    expected = "\n".join(f"  {folder}/{stem}[.gz]" for folder in candidates for stem in _IDX_FILES.values())
    raise FileNotFoundError(f"{dataset}: idx files not found; expected all four of\n{expected}\n{how}")


def _load_idx_dataset(name: str, candidates: Sequence[Path], how: str, **kw) -> DataSplits:
    files = _find_idx_dir(candidates, name, how)
    arrays = []
    for split in ("train", "test"):
        x_path, y_path = files[f"{split}_x"], files[f"{split}_y"]
        x = read_idx(x_path, 3)
        y = int_labels(str(y_path), read_idx(y_path, 1), 0, 9)
        same_count(f"{x_path} / {y_path}", len(x), len(y))
        arrays += [x[:, None], y]
    return finish_splits(name, *arrays, num_classes=10, source=str(files["train_x"].parent),
                         files=[str(p) for p in files.values()], **kw)


def load_mnist(root: Optional[PathLike] = None, **kw) -> DataSplits:
    """MNIST from torchvision's layout ``root/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``.

    ``kw``: ``train_size``, ``test_size``, ``seed``, ``normalize`` (see :func:`load_dataset`).
    """
    folder = data_root(root) / "MNIST" / "raw"
    how = ("Get them from https://ossci-datasets.s3.amazonaws.com/mnist/ (a mirror of yann.lecun.com/exdb/mnist), "
           f"or once with internet: torchvision.datasets.MNIST({str(data_root(root))!r}, download=True).")
    return _load_idx_dataset("mnist", [folder], how, **kw)


def load_fashion_mnist(root: Optional[PathLike] = None, **kw) -> DataSplits:
    """Fashion-MNIST from ``root/FashionMNIST/raw/`` (torchvision's layout), else the Debian package's
    ``/usr/share/datasets/fashion-mnist/`` (``apt-get install dataset-fashion-mnist``); files gzipped or not.
    """
    r = data_root(root)
    how = ("Install the real files with `sudo apt-get install dataset-fashion-mnist`, or put them under "
           f"{r / 'FashionMNIST' / 'raw'} (https://github.com/zalandoresearch/fashion-mnist).")
    return _load_idx_dataset("fashion_mnist", [r / "FashionMNIST" / "raw", DEBIAN_FASHION_MNIST], how, **kw)

