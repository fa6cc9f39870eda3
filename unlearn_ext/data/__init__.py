"""Data sets yielding ``(x, y, sample_id)``, forget-set selection and loaders (SPEC §6).

One module per on-disk format (``idx``, ``cifar``, ``svhn``, ``medmnist_npz``) plus scikit-learn's ``digits``;
``finish`` turns what a reader returns into :class:`DataSplits`, ``registry`` picks a loader by name.

Every loader returns :class:`DataSplits` with float32 images in [0, 1], channels first (optionally
standardised with the training set's per-channel mean/std). A missing file raises ``FileNotFoundError``
naming the expected path(s) and where to get the files; a truncated or corrupt file raises ``ValueError``
naming the file — nothing is returned half-loaded. ``train_size``/``test_size`` draw a seeded random subset
(before the float conversion, so a subsampled CIFAR-10 never holds the full float copy). The data root
defaults to ``$UNLEARN_EXT_DATA``, else ``./data``.
"""
from .cifar import load_cifar10, read_cifar_batch
from .core import DataSplits, IndexedTensorDataset, forget_ids, loader, split_forget
from .digits import load_digits
from .idx import load_fashion_mnist, load_mnist, read_idx
from .medmnist_npz import load_organamnist
from .registry import available_datasets, default_dataset, load_dataset
from .root import data_root
from .svhn import load_svhn, read_svhn_mat

__all__ = ["DataSplits", "IndexedTensorDataset", "forget_ids", "split_forget", "loader", "load_digits",
           "available_datasets", "data_root", "default_dataset", "load_cifar10", "load_dataset",
           "load_fashion_mnist", "load_mnist", "load_organamnist", "load_svhn", "read_cifar_batch", "read_idx",
           "read_svhn_mat"]
