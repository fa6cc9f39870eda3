"""SVHN .mat files written here with scipy, read through the real loader."""
import re

import numpy as np
import pytest

from data_writers import truncate, write_svhn, write_svhn_split
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



@pytest.mark.parametrize("case, says", [("nan", "nan"), ("fraction", "1.5"), ("strings", "integers"), ("zero", "1..10"),
                                        ("eleven", "1..10"), ("no-samples", "no samples"),
                                        ("smaller-images", "20, 20")])
def test_svhn_bad_content_names_the_file(tmp_path, case, says):
    folder, written = write_svhn(tmp_path)
    x, y = written["train"]
    if case == "no-samples":
        x, y = x[..., :0], y[:0]
    elif case == "smaller-images":
        x = x[:20, :20]
    else:
        y = {"nan": np.full(y.shape, np.nan), "fraction": np.full(y.shape, 1.5), "strings": np.array(["a"] * len(y)),
             "zero": y * 0, "eleven": y * 0 + 11}[case]
    path = write_svhn_split(folder, "train", x, y)
    with pytest.raises(ValueError, match=re.escape(str(path))) as e:
        load_svhn(tmp_path)
    assert says in str(e.value)


def test_svhn_labels_stored_as_doubles_load(tmp_path):
    folder, written = write_svhn(tmp_path)
    x, y = written["train"]
    write_svhn_split(folder, "train", x, y.astype(np.float64))  # MATLAB's default type
    assert load_svhn(tmp_path).train.y.tolist() == [0, 1, 2, 3, 4, 5, 6]
