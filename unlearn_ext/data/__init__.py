"""Data sets yielding ``(x, y, sample_id)``, forget-set selection and loaders (SPEC §6)."""
from .core import DataSplits, IndexedTensorDataset, forget_ids, loader, split_forget
from .digits import load_digits
from .files import (available_datasets, data_root, default_dataset, load_cifar10, load_dataset,
                    load_fashion_mnist, load_mnist, load_organamnist, load_svhn, read_cifar_batch, read_idx,
                    read_svhn_mat)

__all__ = ["DataSplits", "IndexedTensorDataset", "forget_ids", "loader", "split_forget", "load_digits",
           "available_datasets", "data_root", "default_dataset", "load_cifar10", "load_dataset",
           "load_fashion_mnist", "load_mnist", "load_organamnist", "load_svhn", "read_cifar_batch", "read_idx",
           "read_svhn_mat"]
