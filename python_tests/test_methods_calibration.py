"""The calibration hook (issue 12): the baselines whose strength grows with epochs take ``stop_forget_acc`` /
``stop_every_step`` (default off: the original behaviour), checked exactly as the paper's methods do
(common.ForgetAccuracyStop / run_epochs), and report forget_acc, target_forget_acc, steps, stopped_early.
FT and CF-k stop their fine-tune the same way; MSG, CT and EU-k, which forget by a change and repair on D_r,
keep their most-repaired state within the target."""
from __future__ import annotations

import copy

import pytest
import torch

from unlearn_ext.data import forget_ids, load_digits, loader, split_forget
from unlearn_ext.methods import unlearn
from unlearn_ext.metrics import accuracy
from unlearn_ext.models import make_model
from unlearn_ext.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")
HOOKED = {"ga": {}, "ng_plus": {"alpha": 0.5}, "srl": {}, "salun": {}, "bad_teacher": {}}


@pytest.fixture(scope="module")
def setting():
    splits = load_digits()
    forget, retain = split_forget(splits.train, forget_ids(splits.train, cls=3))  # a class: forgetting shows
    torch.manual_seed(0)
    model = make_model("mlp", (1, 8, 8), 10, hidden=64)
    train(model, loader(splits.train, 128, shuffle=True), TrainConfig(epochs=8, lr=3e-3))
    return model, loader(forget, 64), retain


@pytest.mark.parametrize("name", sorted(HOOKED))
def test_stops_at_the_forget_accuracy_target(setting, name):
    model, forget, retain_set = setting
    retain = loader(retain_set, 128, shuffle=True)
    assert accuracy(model, forget) > 0.9
    net = copy.deepcopy(model)
    res = unlearn(name, net, forget=forget, retain=retain, epochs=30, stop_forget_acc=0.5, stop_every_step=True,
                  **HOOKED[name])
    st = res.stats
    assert st["stopped_early"] and st["target_forget_acc"] == 0.5
    assert st["forget_acc"] == accuracy(net, forget) <= 0.5
    assert 1 <= st["steps"] < 30 * len(retain)


@pytest.mark.parametrize("name", sorted(HOOKED))
def test_epoch_checks_leave_the_update_unchanged(setting, name):
    """Checked before each epoch: stopping after E epochs gives the model E epochs without the hook give."""
    model, forget, retain_set = setting
    stopped = copy.deepcopy(model)
    res = unlearn(name, stopped, forget=forget, retain=loader(retain_set, 128, shuffle=True), epochs=30,
                  stop_forget_acc=0.5, **HOOKED[name])
    assert res.stats["stopped_early"] and res.stats["epochs"] >= 1
    plain = copy.deepcopy(model)
    res_plain = unlearn(name, plain, forget=forget, retain=loader(retain_set, 128, shuffle=True),
                        epochs=res.stats["epochs"], **HOOKED[name])
    assert "forget_acc" not in res_plain.stats  # off by default: the original behaviour and stats
    assert res_plain.stats["steps"] == res.stats["steps"]
    for p, q in zip(stopped.parameters(), plain.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", sorted(HOOKED))
def test_a_model_already_at_the_target_is_left_untouched(setting, name):
    model, forget, retain_set = setting
    net = copy.deepcopy(model)
    res = unlearn(name, net, forget=forget, retain=loader(retain_set, 128), epochs=5, stop_forget_acc=1.0,
                  **HOOKED[name])
    assert res.stats["steps"] == 0 and res.stats["stopped_early"]
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), model.parameters()))


#: Fine-tunes on D_r with a stopping hook, and the hyper-parameters that make them forget class 3 here.
REPAIRS = {"finetune": {"lr": 3e-3}, "cfk": {}}


@pytest.fixture(scope="module")
def conv_setting():
    splits = load_digits()
    forget, retain = split_forget(splits.train, forget_ids(splits.train, cls=3))
    torch.manual_seed(0)
    model = make_model("lenet", (1, 8, 8), 10)
    train(model, loader(splits.train, 128, shuffle=True), TrainConfig(epochs=8, lr=3e-3))
    return model, loader(forget, 64), retain


@pytest.mark.parametrize("name", sorted(REPAIRS))
def test_repairs_stop_at_the_forget_accuracy_target(conv_setting, name):
    model, forget, retain_set = conv_setting
    assert accuracy(model, forget) > 0.8
    net = copy.deepcopy(model)
    res = unlearn(name, net, forget=forget, retain=loader(retain_set, 128, shuffle=True), epochs=30,
                  stop_forget_acc=0.5, stop_every_step=True, **REPAIRS[name])
    st = res.stats
    assert st["stopped_early"] and st["target_forget_acc"] == 0.5
    assert st["forget_acc"] == accuracy(net, forget) <= 0.5
    assert 1 <= st["steps"] < 30 * len(retain_set)


def test_finetune_stopped_by_epoch_equals_as_many_plain_epochs(conv_setting):
    model, forget, retain_set = conv_setting
    stopped = copy.deepcopy(model)
    res = unlearn("finetune", stopped, forget=forget, retain=loader(retain_set, 128, shuffle=True), epochs=30,
                  lr=3e-4, stop_forget_acc=0.5)
    assert res.stats["stopped_early"] and res.stats["finetune_epochs"] >= 1
    plain = copy.deepcopy(model)
    res_plain = unlearn("finetune", plain, forget=forget, retain=loader(retain_set, 128, shuffle=True),
                        epochs=res.stats["finetune_epochs"], lr=3e-4)
    assert "forget_acc" not in res_plain.stats
    assert res_plain.stats["steps"] == res.stats["steps"]
    assert all(torch.equal(p, q) for p, q in zip(stopped.parameters(), plain.parameters()))


@pytest.mark.parametrize("name", ["msg", "ct", "euk"])
def test_a_repair_keeps_its_most_repaired_state_within_the_target(conv_setting, name):
    """MSG/CT/EU-k forget by a change and repair on D_r: the repair runs in full and the model ends at the last
    checked state whose forget accuracy is within the target."""
    model, forget, retain_set = conv_setting
    net = copy.deepcopy(model)
    res = unlearn(name, net, forget=forget, retain=loader(retain_set, 128), stop_forget_acc=0.5,
                  stop_every_step=True)
    st = res.stats
    assert st["forget_acc"] == accuracy(net, forget) <= 0.5
    assert 0 <= st["steps"] <= st["steps_run"] and st["steps_run"] > 0
    assert not all(torch.equal(p, q) for p, q in zip(net.parameters(), model.parameters()))


@pytest.mark.parametrize("name", ["msg", "ct", "euk"])
def test_a_repair_always_within_the_target_is_the_plain_run(conv_setting, name):
    model, forget, retain_set = conv_setting
    hooked, plain = copy.deepcopy(model), copy.deepcopy(model)
    res = unlearn(name, hooked, forget=forget, retain=loader(retain_set, 128), stop_forget_acc=1.0,
                  stop_every_step=True)
    res_plain = unlearn(name, plain, forget=forget, retain=loader(retain_set, 128))
    assert res.stats["steps"] == res.stats["steps_run"] == res_plain.stats["steps"] > 0
    assert not res.stats["stopped_early"]
    assert all(torch.equal(p, q) for p, q in zip(hooked.parameters(), plain.parameters()))


def test_a_repair_past_the_target_is_taken_back(conv_setting):
    """On a random forget set EU-k's repair re-learns D_f past the target: the model returns to the last
    state within it (fewer steps than were run)."""
    model = conv_setting[0]
    splits = load_digits()
    forget_set, retain_set = split_forget(splits.train, forget_ids(splits.train, ratio=0.1, seed=0))
    forget = loader(forget_set, 64)
    net = copy.deepcopy(model)
    res = unlearn("euk", net, forget=forget, retain=loader(retain_set, 128), stop_forget_acc=0.5,
                  stop_every_step=True)
    st = res.stats
    assert st["stopped_early"] and 0 < st["steps"] < st["steps_run"]
    assert st["forget_acc"] == accuracy(net, forget) <= 0.5
