"""Bad input to the unlearning methods (issue 14): each refused with a ValueError that says what is wrong and
names the argument, before the model (or the store) is touched."""
from __future__ import annotations

import copy

import pytest
import torch

from unlearn_ext import data
from unlearn_ext.methods import available_methods, get_method, unlearn
from unlearn_ext.methods.common import finetune
from unlearn_ext.record import MemoryStore
from unlearn_ext.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setting(digits_lenet):
    train_ds = digits_lenet["train"]
    return {"model": digits_lenet["model"], "store": digits_lenet["store"], "train": train_ds,
            "forget": train_ds.subset(torch.arange(20)), "retain": train_ds.subset(torch.arange(20, 300))}


def _call(setting, name, forget=None, **hp):
    """``unlearn(name, ...)`` on a copy of the model; if it raises, the copy must still equal the model."""
    net = copy.deepcopy(setting["model"])
    kw = dict(forget=data.loader(setting["forget"], 10) if forget is None else forget,
              retain=data.loader(setting["retain"], 60), store=setting["store"])
    try:
        return unlearn(name, net, **kw, **hp)
    except ValueError:
        for p, q in zip(net.parameters(), setting["model"].parameters()):
            assert torch.equal(p, q), f"{name} changed the model before refusing"
        raise


def _batches(ds, size):
    return [b for b in data.loader(ds, size)]


@pytest.mark.parametrize("name", available_methods())
def test_a_generator_forget_set_is_refused_empty_or_not(setting, name):
    """An empty generator used to pass as "0 steps, success" (optimization, label_flip) or crash inside
    torch.cat (partial_amnesiac); a non-empty one would be spent after one pass."""
    with pytest.raises(ValueError, match="forget set is empty"):
        _call(setting, name, forget=(b for b in []))
    with pytest.raises(ValueError, match="forget is a one-shot iterator"):
        _call(setting, name, forget=(b for b in _batches(setting["forget"], 10)))


@pytest.mark.parametrize("name", [n for n in available_methods() if "epochs" in get_method(n).defaults])
@pytest.mark.parametrize("bad", [-3, 1.5, "2", True, None])
def test_epochs_must_be_a_non_negative_integer(setting, name, bad):
    with pytest.raises(ValueError, match=rf"{name}: epochs must be an integer >= 0, got"):
        _call(setting, name, epochs=bad)


def test_other_integer_and_ratio_hyper_parameters_are_checked(setting):
    cases = [("sfron", dict(steps=-1), "steps must be an integer >= 0"),
             ("sfron", dict(forget_every=0), "forget_every must be an integer >= 1"),
             ("certified", dict(depth=2.5), "depth must be an integer >= 1"),
             ("partial_label_flip", dict(keep_ratio=0.0), r"keep_ratio must be a finite number in \(0, 1\]"),
             ("partial_optimization", dict(keep_ratio=1.5), r"keep_ratio must be a finite number in \(0, 1\]"),
             ("salun", dict(threshold=2.0), r"threshold must be a finite number in \(0, 1\]"),
             ("msg", dict(init_rate=-0.1), r"init_rate must be a finite number in \(0, 1\]"),
             ("ga", dict(lr=float("nan")), "lr must be a finite number >= 0"),
             ("ng_plus", dict(alpha=1.5), r"alpha must be a finite number in \[0, 1\]"),
             ("label_flip", dict(stop_forget_acc=1.5), r"stop_forget_acc must be an accuracy in \[0, 1\]"),
             ("label_flip", dict(stop_every_step="yes"), "stop_every_step must be True or False"),
             ("label_flip", dict(stop_forget_acc="original_test"),
              "stop_forget_acc=\"original_test\" needs test_loader="),
             ("optimization", dict(stop_forget_acc="original_test", test_loader=[]), "test_loader yielded no samples"),
             ("ga", dict(stop_forget_acc="original_test"), r"stop_forget_acc must be None or an accuracy in \[0, 1\]"),
             ("certified", dict(delta=1.0), r"delta must be a finite number in \(0, 1\)")]
    for name, hp, match in cases:
        with pytest.raises(ValueError, match=f"{name}: {match}"):
            _call(setting, name, **hp)
    # numpy scalars are numbers: accepted and handed on as plain floats / ints
    res = _call(setting, "partial_label_flip", keep_ratio=__import__("numpy").float32(0.5), epochs=1)
    assert res.stats["hparams"]["keep_ratio"] == 0.5


def test_finetune_refuses_a_negative_epoch_count(setting):
    """`finetune` used to report −15 steps for epochs=-3 (and the FT method ran nothing)."""
    net = copy.deepcopy(setting["model"])
    with pytest.raises(ValueError, match="finetune: epochs must be an integer >= 0, got -3"):
        finetune(net, data.loader(setting["retain"], 60), None, -3)
    with pytest.raises(ValueError, match="finetune: epochs must be an integer >= 0"):
        _call(setting, "finetune", epochs=-3)


def _with_label(ds, i, label):
    return data.IndexedTensorDataset(ds.x, torch.where(torch.arange(len(ds)) == i, torch.tensor(label), ds.y),
                                     ids=ds.ids)


@pytest.mark.parametrize("name", ["label_flip", "partial_label_flip"])
def test_labels_out_of_range_are_refused(setting, name):
    """label_flip used to flip label 12 to (12 + o) mod 10 — a silent wrong answer; now every forget label is
    checked before the first step."""
    with pytest.raises(ValueError, match=f"{name}: label 12 is out of range for a model with 10 outputs"):
        _call(setting, name, forget=data.loader(_with_label(setting["forget"], 3, 12), 10), epochs=1)
    with pytest.raises(ValueError, match=f"{name}: label -1 is out of range"):
        _call(setting, name, forget=data.loader(_with_label(setting["forget"], 0, -1), 10), epochs=1)


@pytest.mark.parametrize("name", ["srl", "salun"])
def test_random_label_methods_refuse_out_of_range_retain_labels(setting, name):
    """SRL/SalUn replace the forget labels and train on the retain labels: one out of range is named (where
    cross-entropy would raise an IndexError on the CPU and a device-side assert on CUDA)."""
    net = copy.deepcopy(setting["model"])
    with pytest.raises(ValueError, match="label 12 is out of range for a model with 10 outputs"):
        unlearn(name, net, forget=data.loader(setting["forget"], 10),
                retain=data.loader(_with_label(setting["retain"], 5, 12), 60), epochs=1)


class _DictLoader:
    """A loader yielding dict batches (as the NeurIPS'23 challenge's face data does)."""

    def __init__(self, ds):
        self.batches = [{"image": x, "label": y, "id": i} for x, y, i in data.loader(ds, 10)]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


@pytest.mark.parametrize("name", ["label_flip", "optimization", "ga", "ng_plus", "scrub", "partial_amnesiac"])
def test_dict_batches_are_refused_naming_the_expected_batch(setting, name):
    epochs = {"epochs": 1} if "epochs" in get_method(name).defaults else {}
    with pytest.raises(ValueError, match=r"must yield \(x, y, sample_id\) batches, got a dict with keys "
                                         r"\['id', 'image', 'label'\]"):
        _call(setting, name, forget=_DictLoader(setting["forget"]), **epochs)


def test_train_refuses_dict_and_pair_batches(setting):
    net = copy.deepcopy(setting["model"])
    with pytest.raises(ValueError, match=r"\(x, y, sample_id\) batches, got a dict"):
        train(net, _DictLoader(setting["retain"]), TrainConfig(epochs=1))
    pairs = [(x, y) for x, y, _ in data.loader(setting["retain"], 60)]
    with pytest.raises(ValueError, match=r"\(x, y, sample_id\) batches, got a tuple of 2 items"):
        train(net, pairs, TrainConfig(epochs=1))
    floats = [(x, y.float(), i) for x, y, i in data.loader(setting["retain"], 60)]
    with pytest.raises(ValueError, match="labels y must be an integer tensor"):
        train(net, floats, TrainConfig(epochs=1))
    for p, q in zip(net.parameters(), setting["model"].parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", ["amnesiac", "partial_amnesiac"])
def test_a_store_without_records_says_so(setting, name):
    """Training for 0 epochs records nothing; the message used to be that the forget ids "are not training
    samples of this store's run"."""
    model = copy.deepcopy(setting["model"])
    rec = get_method(name).recorder(model, store=MemoryStore())
    train(model, data.loader(setting["train"], 50), TrainConfig(epochs=0), recorders=[rec])
    with pytest.raises(ValueError, match=f"{name}: the store holds no recorded training steps"):
        unlearn(name, model, forget=data.loader(setting["forget"], 10), retain=data.loader(setting["retain"], 60),
                store=rec.store)
