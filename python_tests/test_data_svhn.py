"""SVHN .mat files written here with scipy, read through the real loader."""
import numpy as np
import pytest

from data_writers import truncate, write_svhn
from unlearn_ext.data import load_svhn


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

