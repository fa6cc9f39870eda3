"""Bad input at the algorithm level: refused with a clear ValueError before anything changes."""
import copy

import pytest
import torch

from unlearn_ext import data
from unlearn_ext.methods import available_methods, unlearn


@pytest.fixture(scope="module")
def setting(digits_lenet):
    return digits_lenet["splits"], digits_lenet["train"], digits_lenet["model"], digits_lenet["store"]


@pytest.mark.parametrize("name", available_methods())
def test_empty_forget_set_is_refused_by_every_method(setting, name):
    splits, train_ds, model, store = setting
    net = copy.deepcopy(model)
    empty = data.loader(train_ds.subset(torch.zeros(0, dtype=torch.int64)))
    with pytest.raises(ValueError, match="forget set is empty"):
        unlearn(name, net, forget=empty, retain=data.loader(train_ds), store=store)
    for p, q in zip(net.parameters(), model.parameters()):
        assert torch.equal(p, q)


def test_forget_ids_not_in_the_recording_are_refused(setting):
    splits, train_ds, model, store = setting
    net = copy.deepcopy(model)
    x, y = splits.test.x[:12], splits.test.y[:12]
    outside = data.IndexedTensorDataset(x, y, ids=torch.arange(290, 302))  # ids 300, 301 were never trained on
    with pytest.raises(ValueError, match=r"2 forget id\(s\) appear in no recorded training step"):
        unlearn("partial_amnesiac", net, forget=data.loader(outside), store=store)
    for p, q in zip(net.parameters(), model.parameters()):
        assert torch.equal(p, q)
    assert store.ids_not_recorded(torch.tensor([3, 351, 7, 999])).tolist() == [351, 999]


def test_store_method_without_store_and_unknown_hparam(setting):
    splits, train_ds, model, store = setting
    forget = data.loader(train_ds.subset(torch.arange(5)))
    with pytest.raises(ValueError, match="needs store="):
        unlearn("amnesiac", copy.deepcopy(model), forget=forget, retain=forget)
    with pytest.raises(ValueError, match="unknown hyper-parameter"):
        unlearn("partial_amnesiac", copy.deepcopy(model), forget=forget, store=store, keep_ratioo=0.1)
    with pytest.raises(ValueError, match="unknown method"):
        unlearn("amnesia", copy.deepcopy(model), forget=forget)


def test_package_level_api(setting):
    """`unlearn_ext.unlearn(...)` is the documented entry point (README, docs/algorithms.md)."""
    import unlearn_ext

    splits, train_ds, model, store = setting
    net = copy.deepcopy(model)
    result = unlearn_ext.unlearn("partial_amnesiac", net, forget=data.loader(train_ds.subset(torch.arange(5))),
                                 store=store)
    assert result.model is net and result.stats["steps_removed"] >= 1
    assert set(unlearn_ext.available_methods()) == set(available_methods())
