"""medmnist .npz files written here in the real format, read through the real loader."""
import numpy as np
import pytest

from data_writers import truncate, write_medmnist
from unlearn_ext.data import load_dataset, load_organamnist


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

