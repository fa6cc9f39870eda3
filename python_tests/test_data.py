"""The data sets' shared plumbing: the dispatcher, seeded subsampling, normalisation and forget sets."""
import pytest
import torch

from data_writers import write_idx_set
from unlearn_ext.data import forget_ids, load_dataset, split_forget


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
