"""Data sets read from user-supplied files in their real on-disk formats (SPEC §6).

Formats parsed here (no torchvision dataset classes, so the checks below apply to every file):

* MNIST / Fashion-MNIST: idx files, gzipped or not (detected from the gzip magic, not the file name). The
  header magic (``00 00 08 ndim``) and the sizes it declares are checked against the payload length.
* CIFAR-10: the python pickle batches ``cifar-10-batches-py/data_batch_1..5`` and ``test_batch``, read with
  an unpickler that only accepts the numpy globals such batches contain (a pickle can run code otherwise).
* SVHN: ``train_32x32.mat`` / ``test_32x32.mat`` (MATLAB v5, ``X`` of shape 32×32×3×N, ``y`` N×1 with
  label 10 meaning digit 0) via :func:`scipy.io.loadmat`.
* OrganAMNIST: medmnist's ``organamnist.npz`` (``train_images``/``train_labels``, ``val_*``, ``test_*``),
  read with ``allow_pickle=False``. The val split is not used: train is D, test is D_t.

Every loader returns :class:`DataSplits` with float32 images in [0, 1], channels first (optionally
standardised with the training set's per-channel mean/std). A missing file raises ``FileNotFoundError``
naming the expected path(s) and where to get the files; a truncated or corrupt file raises ``ValueError``
naming the file — nothing is returned half-loaded. ``train_size``/``test_size`` draw a seeded random subset
(before the float conversion, so a subsampled CIFAR-10 never holds the full float copy).

The data root defaults to ``$UNLEARN_EXT_DATA``, else ``./data``.
"""
from __future__ import annotations

import gzip
import io
import os
import pickle
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .core import DataSplits, IndexedTensorDataset
from .digits import load_digits

PathLike = Union[str, os.PathLike]

#: Where the Debian package ``dataset-fashion-mnist`` installs the real Fashion-MNIST files.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

_IDX_FILES = {"train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
              "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte"}


def data_root(root: Optional[PathLike] = None) -> Path:
    """``root`` if given, else ``$UNLEARN_EXT_DATA``, else ``./data``."""
    return Path(root if root is not None else os.environ.get("UNLEARN_EXT_DATA", "data")).expanduser()


# --------------------------------------------------------------------------------------------- idx format

def read_idx(path: PathLike) -> np.ndarray:
    """One idx file (gzipped or raw) as a uint8 array of the shape its header declares.

    Only the unsigned-byte type (``0x08``, used by MNIST and Fashion-MNIST) is accepted. A bad magic, a
    corrupt gzip stream or a payload whose length differs from the declared sizes raises ``ValueError``.
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
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise ValueError(f"{path}: truncated idx header")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape))
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
    arrays = {key: read_idx(path) for key, path in files.items()}
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"{files[split + '_x']} / {files[split + '_y']}: images {x.shape} and labels "
                             f"{y.shape} do not match (expected N×H×W and N)")
    return _finish(name, arrays["train_x"][:, None], arrays["train_y"], arrays["test_x"][:, None],
                   arrays["test_y"], num_classes=10, source=str(files["train_x"].parent),
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


# --------------------------------------------------------------------------------------- CIFAR-10 pickles

class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Resolves only the globals a pickled numpy array needs; anything else in the file is refused."""

    _ALLOWED = {("numpy._core.multiarray", "_reconstruct"), ("numpy._core.numeric", "_frombuffer"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        module = module.replace("numpy.core.", "numpy._core.")  # batches pickled before numpy 2
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a data batch")
        return super().find_class(module, name)


def read_cifar_batch(path: PathLike) -> Tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch: images (N, 3, 32, 32) uint8 and labels (N,) int64."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            batch = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError,
            AttributeError) as e:
        raise ValueError(f"{path}: corrupt or truncated CIFAR batch ({type(e).__name__}: {e})") from None
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: not a CIFAR batch (a {type(batch).__name__}, expected a dict)")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise ValueError(f"{path}: CIFAR batch lacks 'data' or 'labels' (keys {sorted(batch)})")
    data, labels = np.asarray(batch["data"]), np.asarray(batch["labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (len(data),):
        raise ValueError(f"{path}: data {data.dtype}{data.shape} / labels {labels.shape} are not "
                         "uint8 N×3072 and N")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(root: Optional[PathLike] = None, **kw) -> DataSplits:
    """CIFAR-10 from ``root/cifar-10-batches-py/data_batch_1..5`` and ``test_batch`` (the python version)."""
    folder = data_root(root) / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    missing = [folder / n for n in names if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(
            "cifar10: missing " + ", ".join(map(str, missing)) + f"\nExtract cifar-10-python.tar.gz from "
            f"https://www.cs.toronto.edu/~kriz/cifar.html into {data_root(root)}, or once with internet: "
            f"torchvision.datasets.CIFAR10({str(data_root(root))!r}, download=True).")
    batches = [read_cifar_batch(folder / n) for n in names]
    train_x = np.concatenate([b[0] for b in batches[:5]])
    train_y = np.concatenate([b[1] for b in batches[:5]])
    return _finish("cifar10", train_x, train_y, *batches[5], num_classes=10, source=str(folder),
                   files=[str(folder / n) for n in names], **kw)


# ------------------------------------------------------------------------------------------- SVHN .mat

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
    return _finish("svhn", train_x, train_y, test_x, test_y, num_classes=10, source=str(folder),
                   files=[str(p) for p in paths], **kw)


# -------------------------------------------------------------------------------------- medmnist .npz

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
    return _finish("organamnist", *split_xy, num_classes=11, source=str(path), files=[str(path)], **kw)


# ------------------------------------------------------------------------------------ shared finishing

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


def _finish(name: str, train_x, train_y, test_x, test_y, *, num_classes: int, source: str,
            files: Sequence[str] = (), train_size: Optional[int] = None, test_size: Optional[int] = None,
            seed: int = 0, normalize: bool = False, notes: Optional[dict] = None) -> DataSplits:
    """Check labels, subsample (seeded), convert to float32 [0, 1], optionally standardise; ids 0..n-1."""
    out_notes = dict(notes or {}, files=list(files))
    parts = []
    for split, x, y, size, s in (("train", train_x, train_y, train_size, seed),
                                 ("test", test_x, test_y, test_size, seed + 1)):
        y = np.array(y, dtype=np.int64)
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"{name}: {split} labels must be in [0, {num_classes}), found "
                             f"{y.min()}..{y.max()} ({source})")
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


def _load_digits(root: Optional[PathLike] = None, **kw) -> DataSplits:
    """scikit-learn's digits (``root`` is ignored: the data ship with scikit-learn)."""
    d = load_digits()
    return _finish("digits", d.train.x.numpy(), d.train.y.numpy(), d.test.x.numpy(), d.test.y.numpy(),
                   num_classes=d.num_classes,
                   source=d.source, **kw)


DATASETS: Dict[str, Callable[..., DataSplits]] = {
    "mnist": load_mnist, "fashion_mnist": load_fashion_mnist, "cifar10": load_cifar10, "svhn": load_svhn,
    "organamnist": load_organamnist, "digits": _load_digits,
}


def available_datasets() -> List[str]:
    return sorted(DATASETS)


def load_dataset(name: str, root: Optional[PathLike] = None, *, train_size: Optional[int] = None,
                 test_size: Optional[int] = None, seed: int = 0, normalize: bool = False) -> DataSplits:
    """Load data set ``name`` (one of :func:`available_datasets`; ``-`` and case are ignored).

    ``train_size`` / ``test_size``: keep a seeded random subset of that many samples (ids renumbered
    0..n-1 in file order); ``seed`` picks it (the test subset uses ``seed + 1``). ``normalize=True``
    standardises every channel with the (subsampled) training set's mean and std, recorded in
    ``notes["normalization"]``; otherwise pixels are in [0, 1].
    """
    key = name.lower().replace("-", "_")
    key = {"fashionmnist": "fashion_mnist", "cifar_10": "cifar10", "organ_a_mnist": "organamnist"}.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; available: {available_datasets()}")
    return DATASETS[key](root, train_size=train_size, test_size=test_size, seed=seed, normalize=normalize)


def default_dataset(root: Optional[PathLike] = None, **kw) -> DataSplits:
    """Fashion-MNIST when its files are present (root or the Debian package), else scikit-learn's digits.

    ``notes["reason"]`` says which was chosen and why. A Fashion-MNIST file that exists but is corrupt
    still raises ``ValueError`` rather than silently falling back. ``kw`` as for :func:`load_dataset`.
    """
    try:
        splits = load_dataset("fashion_mnist", root, **kw)
        splits.notes["reason"] = f"Fashion-MNIST found under {splits.source}"
    except FileNotFoundError as e:
        splits = load_dataset("digits", root, **kw)
        splits.notes["reason"] = ("Fashion-MNIST not found, using scikit-learn's digits instead "
                                  "(`sudo apt-get install dataset-fashion-mnist` installs it). "
                                  + str(e).splitlines()[0])
    return splits
