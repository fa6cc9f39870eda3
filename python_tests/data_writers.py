"""Writers of small data files in each real on-disk format (idx, CIFAR-10 pickles, SVHN .mat, medmnist .npz),
for the loaders' tests: no package ships these data sets and their download hosts are unreachable offline."""
import gzip
import pickle
import struct

import numpy as np

RNG = np.random.default_rng(0)


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
    folder = root / "svhn"
    folder.mkdir(parents=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = RNG.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = ((np.arange(n) + 9) % 10 + 1).reshape(-1, 1).astype(np.uint8)  # 10, 1, 2, ...: 10 means digit 0
        write_svhn_split(folder, split, x, y)
        out[split] = (x, y)
    return folder, out


def write_svhn_split(folder, split, x, y):
    """``folder/{split}_32x32.mat`` holding ``X`` (H×W×3×N) and ``y`` (N×1) as given; returns its path."""
    import scipy.io

    path = folder / f"{split}_32x32.mat"
    scipy.io.savemat(str(path), {"X": x, "y": y})
    return path


def write_medmnist(root, n=(9, 4, 6), channels=None, flag="organamnist", num_classes=11):
    """``root/<flag>.npz`` as medmnist writes it: uint8 images N×28×28[×C] and labels N×1 per split."""
    arrays = {}
    for split, count in zip(("train", "val", "test"), n):
        shape = (count, 28, 28) if channels is None else (count, 28, 28, channels)
        arrays[f"{split}_images"] = RNG.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(count) % num_classes).reshape(-1, 1).astype(np.uint8)
    path = root / f"{flag}.npz"
    np.savez_compressed(path, **arrays)
    return path, arrays


def truncate(path, keep=0.6):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])

