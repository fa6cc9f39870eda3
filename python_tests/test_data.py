"""Data loaders read small files written here in each real on-disk format, through the real code path."""
import gzip
import pickle
import struct
from collections import OrderedDict

import numpy as np
import pytest
import torch

from unlearn_ext.data import (DataSplits, default_dataset, forget_ids, load_cifar10, load_dataset,
                              load_fashion_mnist, load_mnist, load_organamnist, load_svhn, loader, read_idx,
                              split_forget)
from unlearn_ext.data import files

RNG = np.random.default_rng(0)


# ---------------------------------------------------------------------------------------- file writers

def idx_bytes(arr: np.ndarray) -> bytes:
    return struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_idx_set(folder, n_train=30, n_test=12, gz=True, size=28):
    """The four MNIST-layout idx files; returns the arrays written."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"train-images-idx3-ubyte": RNG.integers(0, 256, (n_train, size, size), dtype=np.uint8),
              "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 10,
              "t10k-images-idx3-ubyte": RNG.integers(0, 256, (n_test, size, size), dtype=np.uint8),
              "t10k-labels-idx1-ubyte": (np.arange(n_test, dtype=np.uint8) * 3) % 10}
    for name, arr in arrays.items():
        data = idx_bytes(arr)
        if gz:
            (folder / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return arrays


def cifar_batch(n):
    return {b"batch_label": b"testing batch", b"labels": [int(v) for v in RNG.integers(0, 10, n)],
            b"data": RNG.integers(0, 256, (n, 3072), dtype=np.uint8), b"filenames": [b"x.png"] * n}


def write_cifar(root, n=4):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = cifar_batch(n)
        (folder / name).write_bytes(pickle.dumps(batches[name], protocol=2))
    return folder, batches


def write_svhn(root, n_train=7, n_test=5):
    import scipy.io

    folder = root / "svhn"
    folder.mkdir(parents=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = RNG.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = ((np.arange(n) + 9) % 10 + 1).reshape(-1, 1).astype(np.uint8)  # 10, 1, 2, ...: 10 means digit 0
        scipy.io.savemat(str(folder / f"{split}_32x32.mat"), {"X": x, "y": y})
        out[split] = (x, y)
    return folder, out


def write_medmnist(root, n=(9, 4, 6), channels=None):
    arrays = {}
    for split, count in zip(("train", "val", "test"), n):
        shape = (count, 28, 28) if channels is None else (count, 28, 28, channels)
        arrays[f"{split}_images"] = RNG.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(count) % 11).reshape(-1, 1).astype(np.uint8)
    path = root / "organamnist.npz"
    np.savez_compressed(path, **arrays)
    return path, arrays


def truncate(path, keep=0.6):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# ------------------------------------------------------------------------------------------------ idx

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
    np.testing.assert_array_equal(read_idx(tmp_path / "a"), arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "b.gz"), arr)


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
        read_idx(tmp_path / "bad")
    (tmp_path / "float").write_bytes(b"\x00\x00\x0d\x01" + struct.pack(">I", 1) + b"\x00" * 4)
    with pytest.raises(ValueError, match="unsigned byte"):
        read_idx(tmp_path / "float")
    folder = tmp_path / "MNIST" / "raw"
    write_idx_set(folder, gz=False)
    (folder / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(29, np.uint8)))  # one label short
    with pytest.raises(ValueError, match="do not match"):
        load_mnist(tmp_path)
    (folder / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.full(30, 10, np.uint8)))  # label 10
    with pytest.raises(ValueError, match="labels must be in"):
        load_mnist(tmp_path)


def test_fashion_mnist_root_takes_precedence(tmp_path):
    write_idx_set(tmp_path / "FashionMNIST" / "raw", n_train=20, gz=False)
    d = load_dataset("fashion-mnist", tmp_path)
    assert d.name == "fashion_mnist" and len(d.train) == 20
    assert d.source == str(tmp_path / "FashionMNIST" / "raw")


def test_fashion_mnist_missing_and_default_falls_back_to_digits(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "DEBIAN_FASHION_MNIST", tmp_path / "not-installed")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)
    d = default_dataset(tmp_path)
    assert d.name == "digits" and d.input_shape == (1, 8, 8)
    assert "not found" in d.notes["reason"] and "dataset-fashion-mnist" in d.notes["reason"]


@pytest.mark.skipif(not (files.DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_from_debian_package(tmp_path):
    d = load_fashion_mnist(tmp_path)  # nothing under tmp_path: the installed files are used
    assert (len(d.train), len(d.test)) == (60000, 10000) and d.input_shape == (1, 28, 28)
    assert d.source == str(files.DEBIAN_FASHION_MNIST)
    assert torch.bincount(d.train.y).tolist() == [6000] * 10 and torch.bincount(d.test.y).tolist() == [1000] * 10
    assert 0.27 < float(d.train.x.mean()) < 0.30  # Fashion-MNIST's well-known pixel mean, 0.286
    chosen = default_dataset(tmp_path, train_size=500, test_size=100)
    assert chosen.name == "fashion_mnist" and "found" in chosen.notes["reason"] and len(chosen.train) == 500


# ------------------------------------------------------------------------------------------- CIFAR-10

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


# ----------------------------------------------------------------------------------------------- SVHN

def test_svhn_mat(tmp_path):
    _, written = write_svhn(tmp_path)
    d = load_svhn(tmp_path)
    x, y = written["train"]
    assert d.input_shape == (3, 32, 32) and len(d.train) == 7 and len(d.test) == 5
    assert y[0, 0] == 10 and d.train.y.tolist() == [0, 1, 2, 3, 4, 5, 6]  # label 10 -> digit 0
    img = (d.train.x[4] * 255).round().numpy().astype(np.uint8)
    assert img[2, 5, 9] == x[5, 9, 2, 4]  # X is H×W×C×N


def test_svhn_missing_and_truncated(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_32x32.mat"):
        load_svhn(tmp_path)
    folder, _ = write_svhn(tmp_path)
    truncate(folder / "test_32x32.mat", keep=0.3)
    with pytest.raises(ValueError, match="test_32x32.mat"):
        load_svhn(tmp_path)
    (folder / "test_32x32.mat").write_bytes(b"\x00" * 50)
    with pytest.raises(ValueError, match="test_32x32.mat"):
        load_svhn(tmp_path)


# ------------------------------------------------------------------------------------------- medmnist

def test_organamnist_npz(tmp_path):
    _, arrays = write_medmnist(tmp_path)
    d = load_dataset("organamnist", tmp_path)
    assert d.num_classes == 11 and d.input_shape == (1, 28, 28) and len(d.train) == 9 and len(d.test) == 6
    assert d.train.y.tolist() == arrays["train_labels"].ravel().tolist()
    np.testing.assert_array_equal((d.test.x[:, 0] * 255).round().numpy().astype(np.uint8), arrays["test_images"])


def test_medmnist_colour_npz_is_channels_first(tmp_path):
    _, arrays = write_medmnist(tmp_path, channels=3)
    d = load_organamnist(tmp_path)
    assert d.input_shape == (3, 28, 28)
    assert round(float(d.train.x[2, 1, 4, 6]) * 255) == arrays["train_images"][2, 4, 6, 1]


def test_organamnist_missing_truncated_incomplete(tmp_path):
    with pytest.raises(FileNotFoundError, match="organamnist.npz"):
        load_organamnist(tmp_path)
    path, arrays = write_medmnist(tmp_path)
    truncate(path)
    with pytest.raises(ValueError, match="organamnist.npz"):
        load_organamnist(tmp_path)
    np.savez(path, train_images=arrays["train_images"])
    with pytest.raises(ValueError, match="lacks"):
        load_organamnist(tmp_path)


# ------------------------------------------------------------------------ dispatcher, options, forget

def test_dispatcher_digits_and_unknown():
    d = load_dataset("digits")
    assert d.name == "digits" and d.input_shape == (1, 8, 8) and len(d.train) + len(d.test) == 1797
    with pytest.raises(ValueError, match="available"):
        load_dataset("imagenet")


def test_subsample_is_seeded_and_renumbered(tmp_path):
    write_idx_set(tmp_path / "MNIST" / "raw", n_train=50, n_test=20)
    a = load_dataset("mnist", tmp_path, train_size=10, test_size=5, seed=3)
    b = load_dataset("mnist", tmp_path, train_size=10, test_size=5, seed=3)
    c = load_dataset("mnist", tmp_path, train_size=10, test_size=5, seed=4)
    assert len(a.train) == 10 and len(a.test) == 5 and torch.equal(a.train.ids, torch.arange(10))
    assert torch.equal(a.train.x, b.train.x) and not torch.equal(a.train.x, c.train.x)
    assert a.notes["train_subsample"] == {"size": 10, "seed": 3}
    assert len(load_dataset("mnist", tmp_path, train_size=1000).train) == 50  # larger than the set: all


def test_normalize_uses_training_statistics():
    d = load_dataset("digits", normalize=True)
    assert abs(float(d.train.x.mean())) < 1e-4 and abs(float(d.train.x.std()) - 1) < 1e-2
    assert len(d.notes["normalization"]["mean"]) == 1


def test_forget_sets_seeded_whole_class_and_errors():
    d = load_dataset("digits")
    a, b = forget_ids(d.train, ratio=0.1, seed=1), forget_ids(d.train, ratio=0.1, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, forget_ids(d.train, ratio=0.1, seed=2))
    assert len(a) == round(0.1 * len(d.train))
    cls = forget_ids(d.train, cls=3)
    forget, retain = split_forget(d.train, cls)
    assert (forget.y == 3).all() and not (retain.y == 3).any() and len(forget) + len(retain) == len(d.train)
    with pytest.raises(ValueError, match="empty"):
        split_forget(d.train, torch.tensor([], dtype=torch.int64))
    with pytest.raises(ValueError, match="not in the training set"):
        split_forget(d.train, torch.tensor([0, len(d.train) + 5]))
