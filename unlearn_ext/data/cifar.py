"""CIFAR-10 from the python pickle batches ``cifar-10-batches-py/data_batch_1..5`` and ``test_batch``, read
with an unpickler that only accepts the numpy globals such batches contain (a pickle can run code otherwise)."""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from .checks import int_labels, same_count
from .core import DataSplits
from .finish import finish_splits
from .root import PathLike, data_root


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
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        found = f"{data.dtype}{data.shape}" if isinstance(data, np.ndarray) else f"a {type(data).__name__}"
        raise ValueError(f"{path}: data is {found}, expected a uint8 N×3072 array")
    labels = int_labels(str(path), batch["labels"], 0, 9)
    same_count(str(path), len(data), len(labels))
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
    return finish_splits("cifar10", train_x, train_y, *batches[5], num_classes=10, source=str(folder),
                         files=[str(folder / n) for n in names], **kw)

