"""Data sets yielding ``(x, y, sample_id)``, forget-set selection and loaders (docs/protocol.md#data-sets).

One module per on-disk format plus scikit-learn's ``digits``; ``checks`` holds what every reader verifies in
what it read (labels whole numbers in range, one per image, at least one sample), ``finish`` turns a reader's
arrays into :class:`DataSplits`, ``registry`` picks a loader by name.

Which library reads each format, and why three readers are written here instead:

* ``medmnist_npz`` — MedMNIST (OrganAMNIST): the ``medmnist`` package's ``INFO`` and dataset class, with
  ``download=False`` on the user's ``.npz``.
* ``cifar`` — CIFAR-10 pickles: read here with an unpickler that accepts only the numpy globals a batch holds.
  torchvision's ``CIFAR10`` calls ``pickle.load``, which runs any code a tampered batch carries.
* ``idx`` — MNIST / Fashion-MNIST: read here. torchvision's ``MNIST`` reads only un-gzipped files in its own
  ``<root>/<Class>/raw`` folder (the Debian package installs ``.gz`` files in a system folder), checks the
  header with ``assert`` (gone under ``python -O``) and skips the payload-length check (``strict=False``),
  so a truncated file fails in a reshape with a message that names no file.
* ``svhn`` — SVHN ``.mat``: :func:`scipy.io.loadmat`, as torchvision's ``SVHN`` does; torchvision's class
  itself refuses any file whose MD5 differs from the official one, with a message naming no path.

Every loader returns :class:`DataSplits` with float32 images in [0, 1], channels first (optionally
standardised with the training set's per-channel mean/std). A missing file raises ``FileNotFoundError``
naming the expected path(s) and where to get the files; a truncated, corrupt or malformed file raises
``ValueError`` naming the file — nothing is returned half-loaded. ``train_size``/``test_size`` draw a seeded
random subset (before the float conversion, so a subsampled CIFAR-10 never holds the full float copy). The
data root defaults to ``$UNLEARN_EXT_DATA``, else ``./data``.
"""
from .cifar import load_cifar10, read_cifar_batch
from .core import DataSplits, IndexedTensorDataset, forget_ids, loader, split_forget
from .digits import load_digits
from .idx import load_fashion_mnist, load_mnist, read_idx
from .medmnist_npz import load_medmnist, load_organamnist
from .registry import available_datasets, default_dataset, load_dataset
from .root import data_root
from .svhn import load_svhn, read_svhn_mat

__all__ = ["DataSplits", "IndexedTensorDataset", "forget_ids", "split_forget", "loader", "load_digits",
           "available_datasets", "data_root", "default_dataset", "load_cifar10", "load_dataset",
           "load_fashion_mnist", "load_medmnist", "load_mnist", "load_organamnist", "load_svhn",
           "read_cifar_batch", "read_idx", "read_svhn_mat"]
