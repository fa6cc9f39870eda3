"""CIFAR-10 python pickle batches written here, read through the real loader and its restricted unpickler."""
import pickle
import re
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



@pytest.mark.parametrize("labels", [["cat"] * 4, [float("nan")] * 4, [1.5] * 4, [2**70] * 4, [True] * 4,
                                    [[1, 2], [3]], [-1] * 4, [10] * 4, [1, 2, 3]],
                         ids=["strings", "nan", "fraction", "huge", "bool", "ragged", "negative", "ten", "short"])
def test_cifar_bad_labels_name_the_file(tmp_path, labels):
    folder, _ = write_cifar(tmp_path)
    batch = cifar_batch(4)
    batch[b"labels"] = labels
    (folder / "data_batch_2").write_bytes(pickle.dumps(batch))
    with pytest.raises(ValueError, match=re.escape(str(folder / "data_batch_2"))):
        load_cifar10(tmp_path)


def test_cifar_whole_number_float_labels_load_and_an_empty_batch_is_refused(tmp_path):
    folder, _ = write_cifar(tmp_path)
    batch = cifar_batch(4)
    batch[b"labels"] = np.array([3.0, 0.0, 9.0, 1.0])
    (folder / "data_batch_1").write_bytes(pickle.dumps(batch))
    assert load_cifar10(tmp_path).train.y[:4].tolist() == [3, 0, 9, 1]
    (folder / "test_batch").write_bytes(pickle.dumps(cifar_batch(0)))
    with pytest.raises(ValueError, match=re.escape(str(folder / "test_batch")) + ".*no samples"):
        load_cifar10(tmp_path)
