"""Metrics (docs/protocol.md#metrics): each definition pinned on inputs whose answer is known."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unlearn_ext import data, metrics
from unlearn_ext.metrics import SampleOutputs


def _outputs(conf, labels=None, k=3):
    """SampleOutputs whose true-label softmax probability is exactly ``conf``."""
    conf = torch.as_tensor(conf, dtype=torch.float64)
    n = len(conf)
    labels = torch.zeros(n, dtype=torch.int64) if labels is None else torch.as_tensor(labels)
    rest = (1 - conf) / (k - 1)
    probs = rest[:, None].repeat(1, k)
    probs[torch.arange(n), labels] = conf
    return SampleOutputs(probs.log().float(), labels, torch.arange(n))


def test_sample_outputs_definitions():
    logits = torch.randn(50, 4, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 4, (50,), generator=torch.Generator().manual_seed(2))
    out = SampleOutputs(logits, y, torch.arange(50))
    torch.testing.assert_close(out.loss.float(), F.cross_entropy(logits, y, reduction="none"))
    torch.testing.assert_close(out.confidence.float(), logits.softmax(1)[torch.arange(50), y])
    p = logits.double().softmax(1)
    torch.testing.assert_close(out.entropy, -(p * p.log()).sum(1))
    assert metrics.accuracy_of(out) == pytest.approx(float((logits.argmax(1) == y).double().mean()))


def test_indiscernibility():
    assert metrics.indiscernibility(0.5) == 1.0
    assert metrics.indiscernibility(1.0) == 0.0
    assert metrics.indiscernibility(0.0) == 0.0
    assert metrics.indiscernibility(0.75) == pytest.approx(0.5)


def test_loss_lr_mia_separable_chance_and_errors():
    rng = np.random.default_rng(0)
    members, nonmembers = rng.uniform(0, 0.1, 400), rng.uniform(2, 3, 400)
    sep = metrics.loss_lr_mia_from_losses(members, nonmembers)
    assert sep["accuracy"] > 0.98 and sep["indiscernibility"] < 0.05 and sep["n_per_group"] == 400
    same = metrics.loss_lr_mia_from_losses(rng.exponential(1, 2000), rng.exponential(1, 2000))
    assert abs(same["accuracy"] - 0.5) < 0.06
    with pytest.raises(ValueError, match="at least 10"):
        metrics.loss_lr_mia_from_losses(members[:5], nonmembers)
    with pytest.raises(ValueError, match="non-finite"):
        metrics.loss_lr_mia_from_losses(np.append(members, np.nan), nonmembers)


def test_svc_mia_fraction_of_forget_called_member():
    rng = np.random.default_rng(1)
    retain = _outputs(rng.uniform(0.95, 0.999, 300))  # members: confident
    test = _outputs(rng.uniform(0.34, 0.6, 300))  # non-members: unsure
    remembered = metrics.svc_mia_from_outputs(retain, test, _outputs(rng.uniform(0.95, 0.999, 50)))
    forgotten = metrics.svc_mia_from_outputs(retain, test, _outputs(rng.uniform(0.34, 0.6, 50)))
    assert set(remembered) == set(metrics.SVC_FEATURES)
    assert remembered["confidence"] > 0.95 and forgotten["confidence"] < 0.05
    with pytest.raises(ValueError, match="unknown SVC MIA feature"):
        metrics.svc_mia_from_outputs(retain, test, retain, features=("margin",))


def test_gap_rte_storage():
    ref = {"RA": 0.9, "FA": 0.8, "TA": 0.85, "MIA": 0.5}
    row = {"RA": 0.8, "FA": 1.0, "TA": 0.85, "MIA": 0.7}
    gap = metrics.gap_to(ref, row)
    assert gap["gap_RA"] == pytest.approx(0.1) and gap["gap_FA"] == pytest.approx(0.2)
    assert gap["avg_gap"] == pytest.approx((0.1 + 0.2 + 0.0 + 0.2) / 4)
    with pytest.raises(KeyError):
        metrics.gap_to(ref, row, keys=["LR_MIA"])
    assert metrics.rte(100.0, 4.0) == 25.0
    with pytest.raises(ValueError):
        metrics.rte(1.0, 0.0)
    assert metrics.storage(nbytes=10, dense_nbytes=40)["fraction_of_dense"] == 0.25
    with pytest.raises(ValueError):
        metrics.storage(nbytes=10)


def test_evaluate_on_a_memorising_model():
    """A model that has memorised D_f (and D_r) but not D_t: FA = RA = 1, the attacks see membership."""
    torch.manual_seed(0)
    splits = data.load_digits()
    fids = data.forget_ids(splits.train, ratio=0.1, seed=0)
    forget, retain = data.split_forget(splits.train, fids)
    lookup = {int(i): int(y) for i, y in zip(splits.train.ids, splits.train.y)}

    class Oracle(nn.Module):  # knows the training labels by pixel pattern, guesses uniformly otherwise
        def __init__(self):
            super().__init__()
            self.keys = {tuple(x.flatten().tolist()): lookup[int(i)] for x, i in
                         zip(splits.train.x, splits.train.ids)}
            self.dummy = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            out = torch.zeros(len(x), 10)
            for r, xi in enumerate(x):
                y = self.keys.get(tuple(xi.flatten().tolist()))
                if y is not None:
                    out[r, y] = 10.0
            return out

    row = metrics.evaluate(Oracle(), forget=data.loader(forget), retain=data.loader(retain),
                           test=data.loader(splits.test))
    assert row["FA"] == 1.0 and row["RA"] == 1.0 and row["UA"] == 0.0
    assert row["TA"] < 0.2
    assert row["MIA"] > 0.95 and row["LR_MIA"] > 0.95 and row["indisc"] < 0.1
    assert (row["n_forget"], row["n_retain"], row["n_test"]) == (len(forget), len(retain), len(splits.test))


def test_collect_outputs_restores_mode_and_rejects_empty():
    model = nn.Linear(64, 10).train()
    ds = data.load_digits().test
    out = metrics.collect_outputs(nn.Sequential(nn.Flatten(), model), data.loader(ds, 100))
    assert model.training and len(out) == len(ds)
    assert torch.equal(out.ids, ds.ids)
    with pytest.raises(ValueError, match="no samples"):
        metrics.collect_outputs(model, [])
    assert not math.isnan(metrics.accuracy_of(out))


def test_accuracy_of_an_empty_loader_is_refused_naming_it():
    """No 0 or NaN for a loader that yields nothing: the methods' stopping rules read accuracy too."""
    with pytest.raises(ValueError, match="^test_loader yielded no samples"):
        metrics.accuracy(nn.Linear(4, 2), [], what="test_loader")
    with pytest.raises(ValueError, match="^the loader yielded no samples"):
        metrics.accuracy(nn.Linear(4, 2), [])
