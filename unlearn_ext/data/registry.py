"""Data sets by name: :func:`load_dataset` and the default choice (Fashion-MNIST when present, else digits)."""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

from .cifar import load_cifar10
from .core import DataSplits
from .digits import load_digits
from .finish import finish_splits
from .idx import load_fashion_mnist, load_mnist
from .medmnist_npz import load_organamnist
from .root import PathLike
from .svhn import load_svhn


def _load_digits(root: Optional[PathLike] = None, **kw) -> DataSplits:
    """scikit-learn's digits (``root`` is ignored: the data ship with scikit-learn)."""
    d = load_digits()
    return finish_splits("digits", d.train.x.numpy(), d.train.y.numpy(), d.test.x.numpy(), d.test.y.numpy(),
                         num_classes=d.num_classes, source=d.source, **kw)


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
