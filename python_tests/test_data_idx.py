"""MNIST / Fashion-MNIST idx files written here, read through the real loaders."""
import gzip
import re
import struct

import numpy as np
import pytest
import torch

from data_writers import RNG, idx_bytes, truncate, write_idx_set
from unlearn_ext.data import DataSplits, default_dataset, load_dataset, load_fashion_mnist, load_mnist, loader, read_idx
from unlearn_ext.data import idx


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_loads(tmp_path, gz):
    arrays = write_idx_set(tmp_path / "MNIST" / "raw", gz=gz)
    d = load_mnist(tmp_path)
    assert isinstance(d, DataSplits) and d.name == "mnist" and d.num_classes == 10
    assert d.input_shape == (1, 28, 28) and len(d.train) == 30 and len(d.test) == 12
    assert d.train.x.dtype == torch.float32 and float(d.train.x.min()) >= 0 and float(d.train.x.max()) <= 1
    np.testing.assert_array_equal((d.train.x[:, 0] * 255).round().numpy().astype(np.uint8),
                                  arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(d.test.y.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert torch.equal(d.train.ids, torch.arange(30))
    x, y, ids = next(iter(loader(d.train, batch_size=8)))
    assert x.shape == (8, 1, 28, 28) and y.dtype == torch.int64 and torch.equal(ids, torch.arange(8))


def test_read_idx_gz_equals_raw(tmp_path):
    arr = RNG.integers(0, 256, (3, 5, 4), dtype=np.uint8)
    (tmp_path / "a").write_bytes(idx_bytes(arr))
    (tmp_path / "b.gz").write_bytes(gzip.compress(idx_bytes(arr)))
    np.testing.assert_array_equal(read_idx(tmp_path / "a", 3), arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "b.gz", 3), arr)


def test_missing_mnist_names_paths_and_how(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_mnist(tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte") in msg and "download" in msg


@pytest.mark.parametrize("gz", [True, False])
def test_truncated_idx_raises_valueerror_naming_file(tmp_path, gz):
    write_idx_set(tmp_path / "MNIST" / "raw", gz=gz)
    bad = tmp_path / "MNIST" / "raw" / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
    truncate(bad)
    with pytest.raises(ValueError, match="train-images-idx3-ubyte"):
        load_mnist(tmp_path)


def test_corrupt_idx_header_and_mismatch(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x08\x03\x00\x00" + b"\x00" * 20)
    with pytest.raises(ValueError, match="bad magic"):
        read_idx(tmp_path / "bad", 3)
    (tmp_path / "float").write_bytes(b"\x00\x00\x0d\x01" + struct.pack(">I", 1) + b"\x00" * 4)
    with pytest.raises(ValueError, match="unsigned byte"):
        read_idx(tmp_path / "float", 1)
    folder = tmp_path / "MNIST" / "raw"
    write_idx_set(folder, gz=False)
    (folder / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(29, np.uint8)))  # one label short
    with pytest.raises(ValueError, match="30 images but 29 labels"):
        load_mnist(tmp_path)


def test_fashion_mnist_root_takes_precedence(tmp_path):
    write_idx_set(tmp_path / "FashionMNIST" / "raw", n_train=20, gz=False)
    d = load_dataset("fashion-mnist", tmp_path)
    assert d.name == "fashion_mnist" and len(d.train) == 20
    assert d.source == str(tmp_path / "FashionMNIST" / "raw")


def test_fashion_mnist_missing_and_default_falls_back_to_digits(tmp_path, monkeypatch):
    monkeypatch.setattr(idx, "DEBIAN_FASHION_MNIST", tmp_path / "not-installed")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)
    d = default_dataset(tmp_path)
    assert d.name == "digits" and d.input_shape == (1, 8, 8)
    assert "not found" in d.notes["reason"] and "dataset-fashion-mnist" in d.notes["reason"]


@pytest.mark.skipif(not (idx.DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_from_debian_package(tmp_path):
    d = load_fashion_mnist(tmp_path)  # nothing under tmp_path: the installed files are used
    assert (len(d.train), len(d.test)) == (60000, 10000) and d.input_shape == (1, 28, 28)
    assert d.source == str(idx.DEBIAN_FASHION_MNIST)
    assert torch.bincount(d.train.y).tolist() == [6000] * 10 and torch.bincount(d.test.y).tolist() == [1000] * 10
    assert 0.27 < float(d.train.x.mean()) < 0.30  # Fashion-MNIST's well-known pixel mean, 0.286
    chosen = default_dataset(tmp_path, train_size=500, test_size=100)
    assert chosen.name == "fashion_mnist" and "found" in chosen.notes["reason"] and len(chosen.train) == 500



def _named(path):
    """pytest.raises(match=...) for a message that names ``path``."""
    return re.escape(str(path))


@pytest.mark.parametrize("header", [
    struct.pack(">BBBB", 0, 0, 0x08, 255) + struct.pack(">255I", *([1] * 255)) + b"\x07",  # 255 dimensions
    struct.pack(">BBBB3I", 0, 0, 0x08, 3, 2**31, 2**31, 2**31),  # 2^93 bytes declared, none there
    struct.pack(">BBBB3I", 0, 0, 0x08, 3, 2**32 - 1, 2**32 - 1, 1),  # the product overflows int64
], ids=["255-dims", "huge-dims", "int64-overflow"])
def test_idx_header_with_bad_dimensions_names_the_file(tmp_path, header):
    folder = tmp_path / "MNIST" / "raw"
    write_idx_set(folder, gz=False)
    (folder / "train-images-idx3-ubyte").write_bytes(header)
    with pytest.raises(ValueError, match=_named(folder / "train-images-idx3-ubyte")) as e:
        load_mnist(tmp_path)
    assert "-" not in str(e.value).split(":", 1)[1]  # no negative byte count from an overflowed product


@pytest.mark.parametrize("case", ["label-10", "no-samples", "image-sizes-differ", "labels-as-images"])
def test_idx_bad_content_names_the_file(tmp_path, case):
    folder = tmp_path / "MNIST" / "raw"
    write_idx_set(folder, gz=False)
    bad = folder / ("t10k-images-idx3-ubyte" if case == "image-sizes-differ" else "train-labels-idx1-ubyte")
    if case == "label-10":
        bad.write_bytes(idx_bytes(np.full(30, 10, np.uint8)))
    elif case == "no-samples":
        (folder / "train-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((0, 28, 28), np.uint8)))
        bad.write_bytes(idx_bytes(np.zeros(0, np.uint8)))
    elif case == "image-sizes-differ":
        bad.write_bytes(idx_bytes(np.zeros((12, 20, 20), np.uint8)))
    else:
        bad.write_bytes(idx_bytes(np.zeros((30, 28, 28), np.uint8)))
    with pytest.raises(ValueError, match=_named(bad)):
        load_mnist(tmp_path)
