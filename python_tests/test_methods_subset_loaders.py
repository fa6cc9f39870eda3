"""A loader is the samples it yields (issue 30): a DataLoader with a sampler over part of its dataset — the
standard PyTorch subset loader — is honoured wherever a method reads the dataset behind it (to re-batch it,
for its ids or labels), and a sampler whose samples cannot be read is refused naming the method and the
role. Also: ``unlearn()`` hands the model back in the train/eval mode it came in, and forget ids that are
also retain ids are warned about (refused by the methods that tell the two sets apart by id)."""
from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import (BatchSampler, DataLoader, RandomSampler, Sampler, SequentialSampler, SubsetRandomSampler,
                              TensorDataset, WeightedRandomSampler)

from unlearn_ext import data
from unlearn_ext.methods import available_methods, get_method, unlearn
from unlearn_ext.methods.common import dataset_of, loader_positions, sample_ids, sample_labels
from unlearn_ext.train import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

FORGET = [0, 1, 2, 3]  # few: they touch some of the six recorded steps, not all
RETAIN = list(range(4, 300))
OVERLAPPING = list(range(1, 300))  # shares ids 1, 2, 3 with FORGET
#: Small settings so that every method runs in about a second on the 300-digit LeNet.
QUICK = {"epochs": 1, "depth": 2, "repeats": 1, "woodfisher_samples": 20, "steps": 3,
         "train_config": TrainConfig(epochs=1)}


@pytest.fixture(scope="module")
def setting(digits_lenet):
    return digits_lenet


def _quick(name):
    return {k: v for k, v in QUICK.items() if k in get_method(name).defaults}


def _by_sampler(train_ds, positions, batch_size):
    """The subset loader as PyTorch users write it: the whole dataset, a sampler of positions."""
    return DataLoader(train_ds, batch_size=batch_size, sampler=positions)


def _by_subset(train_ds, positions, batch_size):
    return data.loader(train_ds.subset(torch.tensor(positions)), batch_size)


def _run(setting, name, forget, retain):
    net = copy.deepcopy(setting["model"])
    torch.manual_seed(0)
    result = unlearn(name, net, forget=forget, retain=retain, store=setting["store"], **_quick(name))
    return net, result


def _same_weights(a, b) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("name", available_methods())
def test_a_sampler_loader_gives_what_the_subset_loader_gives(setting, name):
    """Every method, given D_f and D_r as samplers over the whole training set, ends at the weights it
    reaches on loaders of the two subsets (batches equal, one by one). Re-batching methods (SRL, SalUn, Bad
    Teacher, Fisher, MSG, influence, certified) used to re-batch the whole training set, and the amnesiac
    methods to undo every step that held any training sample."""
    train_ds = setting["train"]
    by_sampler, _ = _run(setting, name, _by_sampler(train_ds, FORGET, 2), _by_sampler(train_ds, RETAIN, 60))
    by_subset, _ = _run(setting, name, _by_subset(train_ds, FORGET, 2), _by_subset(train_ds, RETAIN, 60))
    assert _same_weights(by_sampler, by_subset)


def test_partial_amnesiac_undoes_only_the_steps_of_the_sampled_forget_set(setting):
    """The issue's example: SubsetRandomSampler([0, 1]) as the forget set undid every recorded step."""
    store = setting["store"]
    forget = DataLoader(setting["train"], batch_size=2, sampler=SubsetRandomSampler([0, 1]))
    res = unlearn("partial_amnesiac", copy.deepcopy(setting["model"]), forget=forget, store=store)
    assert res.stats["steps_removed"] == len(store.steps_containing(torch.tensor([0, 1])))
    assert res.stats["steps_removed"] < res.stats["steps_total"] == len(store)


def _samplers():
    """(loader keyword arguments, the positions it yields) for every kind of sampler that is honoured."""
    return [({"sampler": [5, 3, 9]}, [5, 3, 9]),
            ({"sampler": (5, 3, 9)}, [5, 3, 9]),
            ({"sampler": range(4, 8)}, [4, 5, 6, 7]),
            ({"sampler": torch.tensor([7, 2])}, [7, 2]),
            ({"sampler": np.array([7, 2])}, [7, 2]),
            ({"sampler": SubsetRandomSampler([8, 1, 6])}, [8, 1, 6]),
            ({"sampler": SequentialSampler(range(3))}, [0, 1, 2]),
            ({"batch_sampler": BatchSampler([4, 0, 2], batch_size=2, drop_last=False)}, [4, 0, 2]),
            ({"batch_sampler": [[3, 4], [11]]}, [3, 4, 11])]


def _without_stored_ids(ds):
    """The same samples in a dataset that keeps no ``ids`` / ``y`` tensors: read by a pass over the loader."""
    return TensorDataset(ds.x, ds.y, ds.ids)


@pytest.mark.parametrize("stored", [True, False], ids=["ids_stored", "ids_by_pass"])
@pytest.mark.parametrize("kw,positions", _samplers())
def test_ids_labels_and_dataset_are_those_the_loader_yields(setting, kw, positions, stored):
    train_ds = setting["train"] if stored else _without_stored_ids(setting["train"])
    extra = {} if "batch_sampler" in kw else {"batch_size": 2}
    loader = DataLoader(train_ds, **kw, **extra)
    expected = torch.tensor(positions)
    assert sorted(sample_ids("m", "forget", loader).tolist()) == sorted(setting["train"].ids[expected].tolist())
    assert sorted(sample_labels(loader).tolist()) == sorted(setting["train"].y[expected].tolist())
    rebatched = dataset_of("m", "forget", loader)
    assert sorted(int(rebatched[i][2]) for i in range(len(rebatched))) == sorted(positions)
    assert sorted(loader_positions("m", "forget", loader).tolist()) == sorted(positions)


def test_the_default_samplers_stand_for_the_whole_dataset(setting):
    train_ds = setting["train"]
    for loader in (data.loader(train_ds, 50), data.loader(train_ds, 50, shuffle=True),
                   DataLoader(train_ds, sampler=RandomSampler(train_ds), batch_size=50)):
        assert loader_positions("m", "retain", loader) is None
        assert dataset_of("m", "retain", loader) is train_ds
        assert torch.equal(sample_ids("m", "retain", loader), train_ds.ids)


class _EveryOther(Sampler):
    def __init__(self, n):
        self.n = n

    def __iter__(self):
        return iter(range(0, self.n, 2))

    def __len__(self):
        return (self.n + 1) // 2


def _unreadable(train_ds):
    """Loaders whose set of samples cannot be read without drawing them, and what the refusal says."""
    n = len(train_ds)
    return [(DataLoader(train_ds, batch_size=10, sampler=WeightedRandomSampler(torch.ones(n), 20)),
             "its sampler is a WeightedRandomSampler"),
            (DataLoader(train_ds, batch_size=10, sampler=RandomSampler(train_ds, replacement=True)),
             "its RandomSampler draws with replacement"),
            (DataLoader(train_ds, batch_size=10, sampler=RandomSampler(train_ds, num_samples=20)),
             "its RandomSampler draws with replacement or a num_samples other than"),
            (DataLoader(train_ds, batch_size=10, sampler=_EveryOther(n)), "its sampler is a _EveryOther"),
            (DataLoader(train_ds, batch_size=None, sampler=[0, 1]), "automatic batching is disabled"),
            (DataLoader(train_ds, batch_size=10, sampler=[0, n]),
             f"its sampler draws position {n}, outside its dataset of {n} samples"),
            (DataLoader(train_ds, batch_size=10, sampler=[0.5, 1.0]),
             "its sampler holds torch.float32 values, not integer positions")]


@pytest.mark.parametrize("case", range(7))
@pytest.mark.parametrize("name,role", [("srl", "forget"), ("srl", "retain"), ("bad_teacher", "forget"),
                                       ("fisher", "retain"), ("partial_amnesiac", "forget")])
def test_a_sampler_that_cannot_be_read_is_refused_naming_method_and_role(setting, name, role, case):
    loader, reason = _unreadable(setting["train"])[case]
    loaders = {"forget": _by_subset(setting["train"], FORGET, 2), "retain": _by_subset(setting["train"], RETAIN, 60)}
    loaders[role] = loader
    net = copy.deepcopy(setting["model"])
    with pytest.raises(ValueError, match=rf"{name}: cannot tell which samples the {role} loader yields: {reason}"):
        unlearn(name, net, **loaders, store=setting["store"], **_quick(name))
    assert _same_weights(net, setting["model"])


def test_a_method_that_only_iterates_the_forget_loader_takes_any_sampler(setting):
    """label_flip reads the forget labels only to check them, by a pass: it runs on a weighted sampler."""
    forget = DataLoader(setting["train"], batch_size=10, sampler=WeightedRandomSampler(torch.ones(300), 20))
    res = unlearn("label_flip", copy.deepcopy(setting["model"]), forget=forget, epochs=1)
    assert res.stats["steps"] == 2


@pytest.mark.parametrize("name", available_methods())
def test_a_sampler_over_no_position_is_an_empty_set(setting, name):
    """The emptiness check read the dataset's size: an empty sampler passed, and e.g. GA ran 0 steps."""
    empty = DataLoader(setting["train"], batch_size=10, sampler=[])
    retain = _by_subset(setting["train"], RETAIN, 60)
    with pytest.raises(ValueError, match=f"{name}: the forget set is empty"):
        unlearn(name, copy.deepcopy(setting["model"]), forget=empty, retain=retain, store=setting["store"],
                **_quick(name))
    if get_method(name).needs_retain:
        with pytest.raises(ValueError, match=f"{name}: needs retain="):
            unlearn(name, copy.deepcopy(setting["model"]), forget=_by_subset(setting["train"], FORGET, 2),
                    retain=empty, store=setting["store"], **_quick(name))


@pytest.mark.parametrize("name", ["ga", "finetune", "certified", "fisher", "partial_amnesiac", "srl", "retrain"])
def test_unlearn_hands_the_model_back_in_the_mode_it_came_in(setting, name):
    """``unlearn()`` used to put every model in eval mode; now each module keeps its own mode (a model in
    train mode with a frozen part stays so)."""
    forget, retain = _by_subset(setting["train"], FORGET, 2), _by_subset(setting["train"], RETAIN, 60)
    for mode in ("train", "eval", "mixed"):
        net = copy.deepcopy(setting["model"]).train(mode != "eval")
        if mode == "mixed":
            net.features.eval()
        before = [m.training for m in net.modules()]
        unlearn(name, net, forget=forget, retain=retain, store=setting["store"], **_quick(name))
        assert [m.training for m in net.modules()] == before, mode


def test_forget_ids_also_in_the_retain_set_are_warned_about(setting):
    train_ds = setting["train"]
    forget, overlapping = _by_subset(train_ds, FORGET, 2), _by_subset(train_ds, OVERLAPPING, 60)
    with pytest.warns(UserWarning, match=r"finetune: 3 forget sample id\(s\) are also retain sample ids, "
                                         r"e\.g\. \[1, 2, 3\]"):
        unlearn("finetune", copy.deepcopy(setting["model"]), forget=forget, retain=overlapping, epochs=0)
    with pytest.warns(UserWarning, match="ga: 3 forget sample id"):  # the sampler's positions, not the dataset
        unlearn("ga", copy.deepcopy(setting["model"]), forget=forget,
                retain=_by_sampler(train_ds, OVERLAPPING, 60), epochs=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        unlearn("finetune", copy.deepcopy(setting["model"]), forget=forget, retain=_by_sampler(train_ds, RETAIN, 60),
                epochs=0)


@pytest.mark.parametrize("name", ["srl", "salun", "bad_teacher"])
@pytest.mark.parametrize("stored", [True, False], ids=["ids_stored", "ids_by_pass"])
def test_methods_that_tell_the_sets_apart_by_id_refuse_shared_ids(setting, name, stored):
    """SRL, SalUn and Bad Teacher pick the forget samples of a mixed batch by id: a retain sample with a forget
    id was silently relabelled (taught by the bad teacher) as if it were to be forgotten."""
    train_ds = setting["train"] if stored else _without_stored_ids(setting["train"])
    net = copy.deepcopy(setting["model"])
    with pytest.raises(ValueError, match=rf"{name}: 3 forget sample id\(s\) are also retain sample ids"):
        unlearn(name, net, forget=_by_sampler(train_ds, FORGET, 2),
                retain=_by_sampler(train_ds, OVERLAPPING, 60), epochs=1)
    assert _same_weights(net, setting["model"])
