"""CIFAR-10 python pickle batches written here, read through the real loader and its restricted unpickler."""
import pickle
from collections import OrderedDict

import numpy as np
import pytest

from data_writers import cifar_batch, truncate, write_cifar
from unlearn_ext.data import load_cifar10


def test_cifar10_pickle_batches(tmp_path):
    _, batches = write_cifar(tmp_path)
    d = load_cifar10(tmp_path)
    assert d.input_shape == (3, 32, 32) and len(d.train) == 20 and len(d.test) == 4
    row = batches["data_batch_2"][b"data"][1]  # channel-major rows of 32×32
    img = (d.train.x[5] * 255).round().numpy().astype(np.uint8)
    assert img[1, 3, 7] == row[1 * 1024 + 3 * 32 + 7] and img[2, 31, 0] == row[2 * 1024 + 31 * 32]
    assert d.test.y.tolist() == batches["test_batch"][b"labels"]


def test_cifar10_missing_truncated_corrupt_and_unsafe(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        load_cifar10(tmp_path)
    folder, _ = write_cifar(tmp_path)
    truncate(folder / "data_batch_3")
    with pytest.raises(ValueError, match="data_batch_3"):
        load_cifar10(tmp_path)
    (folder / "data_batch_3").write_bytes(b"this is not a pickle at all")
    with pytest.raises(ValueError, match="data_batch_3"):
        load_cifar10(tmp_path)
    bad = cifar_batch(4)
    bad[b"data"] = bad[b"data"][:, :100]
    (folder / "data_batch_3").write_bytes(pickle.dumps(bad))
    with pytest.raises(ValueError, match="N×3072"):
        load_cifar10(tmp_path)
    (folder / "data_batch_3").write_bytes(pickle.dumps(OrderedDict(cifar_batch(4))))  # a non-numpy global
    with pytest.raises(ValueError, match="not allowed"):
        load_cifar10(tmp_path)

