"""medmnist .npz files written here in the real format, read through the real loader."""
import re

import medmnist
import numpy as np
import pytest

from data_writers import truncate, write_medmnist
from unlearn_ext.data import load_dataset, load_medmnist, load_organamnist


def test_organamnist_npz_read_by_medmnist(tmp_path, monkeypatch):
    reads = []
    medmnist_init = medmnist.OrganAMNIST.__init__

    def spy(self, split, **kw):
        reads.append((split, kw["download"], kw["root"]))
        medmnist_init(self, split, **kw)

    monkeypatch.setattr(medmnist.OrganAMNIST, "__init__", spy)
    _, arrays = write_medmnist(tmp_path)
    d = load_dataset("organamnist", tmp_path)
    assert reads == [("train", False, str(tmp_path)), ("test", False, str(tmp_path))]
    assert d.num_classes == 11 and d.input_shape == (1, 28, 28) and len(d.train) == 9 and len(d.test) == 6
    assert d.train.y.tolist() == arrays["train_labels"].ravel().tolist()
    np.testing.assert_array_equal((d.test.x[:, 0] * 255).round().numpy().astype(np.uint8), arrays["test_images"])
    assert d.notes["class_names"][:2] == ["bladder", "femur-left"] and len(d.notes["class_names"]) == 11


def test_colour_medmnist_set_is_channels_first(tmp_path):
    _, arrays = write_medmnist(tmp_path, channels=3, flag="pathmnist", num_classes=9)
    d = load_medmnist("pathmnist", tmp_path)
    assert d.input_shape == (3, 28, 28) and d.num_classes == 9
    assert round(float(d.train.x[2, 1, 4, 6]) * 255) == arrays["train_images"][2, 4, 6, 1]


def test_channels_must_match_medmnist_info(tmp_path):
    path, _ = write_medmnist(tmp_path, channels=3)  # OrganAMNIST is grey
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*1 channel"):
        load_organamnist(tmp_path)


@pytest.mark.parametrize("flag", ["chestmnist", "organmnist3d", "imagenet"])
def test_multi_label_3d_and_unknown_flags_are_refused(tmp_path, flag):
    with pytest.raises(ValueError, match=f"flag='{flag}'.*organamnist"):
        load_medmnist(flag, tmp_path)


def test_pickled_member_is_refused_not_unpickled(tmp_path):
    path, arrays = write_medmnist(tmp_path)
    arrays["train_labels"] = np.array([{"label": 1}] * 9, dtype=object)
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*allow_pickle=False"):
        load_organamnist(tmp_path)


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



@pytest.mark.parametrize("case, says", [
    ("fraction", "whole numbers"), ("nan", "nan"), ("strings", "integers"), ("negative", "0..10"),
    ("eleven", "0..10"), ("multi-label", "shape (9, 2)"), ("no-samples", "no samples"),
    ("count-mismatch", "9 images but 8 labels"), ("smaller-test-images", "N×28×28")])
def test_organamnist_bad_content_names_the_file(tmp_path, case, says):
    path, arrays = write_medmnist(tmp_path)
    labels = arrays["train_labels"].astype(np.float64)
    if case == "fraction":
        arrays["train_labels"] = labels + 0.5
    elif case == "nan":
        labels[3] = np.nan
        arrays["train_labels"] = labels
    elif case == "strings":
        arrays["train_labels"] = labels.astype(str)
    elif case == "negative":
        arrays["train_labels"] = labels.astype(np.int64) - 1
    elif case == "eleven":
        arrays["train_labels"] = labels.astype(np.int64) + 3  # 3..11
    elif case == "multi-label":
        arrays["train_labels"] = np.zeros((9, 2), np.uint8)
    elif case == "no-samples":
        arrays["train_images"], arrays["train_labels"] = arrays["train_images"][:0], arrays["train_labels"][:0]
    elif case == "count-mismatch":
        arrays["train_labels"] = arrays["train_labels"][:8]
    else:
        arrays["test_images"] = arrays["test_images"][:, :20, :20]
    np.savez_compressed(path, **arrays)
    with pytest.raises(ValueError, match=re.escape(str(path))) as e:
        load_organamnist(tmp_path)
    assert says in str(e.value)


def test_npy_saved_as_npz_names_the_file(tmp_path):
    path = tmp_path / "organamnist.npz"
    with open(path, "wb") as f:
        np.save(f, np.zeros((4, 28, 28), np.uint8))
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_organamnist(tmp_path)


def test_corrupt_member_behind_an_intact_zip_directory_names_the_file(tmp_path):
    path, _ = write_medmnist(tmp_path, n=(200, 4, 6))
    data = bytearray(path.read_bytes())
    data[len(data) // 3: len(data) // 3 + 64] = bytes(64)  # inside train_images' deflate stream
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": corrupt"):
        load_organamnist(tmp_path)
