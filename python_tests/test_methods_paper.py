"""The paper's methods (Gogineni & Nadimi, docs/algorithms.md) on real data: scikit-learn's digits, a small MLP, one
whole class (digit 3) forgotten.

Scenario. The model is trained with the paper's recipe (Adam at 1e-3; more epochs and a smaller batch
than the paper's 8 × 128 because digits is tiny) while recorders store its updates: dense (naive
amnesiac) and layer-wise pruned at r = 1.0, 0.2. The forget class's samples come in batches of their
own (retain and forget samples are shuffled separately into batches, the batch order is shuffled) —
amnesiac unlearning's premise that deletable data touch few steps; with fully mixed batches a whole class
is in every batch and removing B_f removes everything (that case is tested too: it returns the initial
weights). Retrain (the same recipe on D_r from a fresh init) is the reference: its forget accuracy is 0.

"Forgets" means: forget accuracy falls from the original's (≈0.95) at least ``GAP_CLOSED`` of the way to
the retrained model's (0). "Keeps utility" means: accuracy on the test samples of the other nine classes
(``test_r``; the forgotten class's test samples should be forgotten too) stays within the stated margin of
the original's. Every number is printed (``pytest -s``) — the table in the report.
"""
import copy
import math
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

warnings.filterwarnings("ignore", message="unlearn_ext: compiled kernels not loaded")

from unlearn_ext import ops  # noqa: E402
from unlearn_ext.data import IndexedTensorDataset, forget_ids, load_digits, loader, split_forget  # noqa: E402
from unlearn_ext.methods import (Method, UnlearnResult, available_methods, get_method, register_method,  # noqa: E402
                                 unlearn)
from unlearn_ext.methods import base as methods_base  # noqa: E402
from unlearn_ext.methods.paper import label_flip as label_flip_module  # noqa: E402
from unlearn_ext.metrics import accuracy  # noqa: E402
from unlearn_ext.methods.paper import FlippedLabels, NaiveAmnesiac, PartialAmnesiac  # noqa: E402
from unlearn_ext.models import make_model  # noqa: E402
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook  # noqa: E402
from unlearn_ext.optim import PartialSGD  # noqa: E402
from unlearn_ext.record import UpdateRecorder  # noqa: E402
from unlearn_ext.train import TrainConfig, train  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

FORGET_CLASS = 3
BATCH = 64
CFG = TrainConfig(epochs=20, batch_size=BATCH, lr=1e-3)
GAP_CLOSED = 0.4  # "forgets": forget accuracy at least this fraction of the way to the retrained model's
PAPER_METHODS = ["amnesiac", "partial_amnesiac", "label_flip", "partial_label_flip", "optimization",
                 "partial_optimization", "retrain", "finetune"]


class GroupedBatches:
    """A batch sampler: each epoch, retain and forget positions shuffled into separate batches of ``bs``,
    the batches then visited in a shuffled order (seeded)."""

    def __init__(self, is_forget: torch.Tensor, bs: int, seed: int):
        self.forget, self.retain = is_forget.nonzero().view(-1), (~is_forget).nonzero().view(-1)
        self.bs, self.gen = bs, torch.Generator().manual_seed(seed)

    def _split(self, pos):
        return list(pos[torch.randperm(len(pos), generator=self.gen)].split(self.bs))

    def __len__(self):
        return math.ceil(len(self.forget) / self.bs) + math.ceil(len(self.retain) / self.bs)

    def __iter__(self):
        chunks = self._split(self.retain) + self._split(self.forget)
        for i in torch.randperm(len(chunks), generator=self.gen).tolist():
            yield chunks[i].tolist()


@pytest.fixture(scope="module")
def s():
    torch.manual_seed(0)
    d = load_digits()
    fid = forget_ids(d.train, cls=FORGET_CLASS)
    forget_ds, retain_ds = split_forget(d.train, fid)
    other = (d.test.y != FORGET_CLASS).nonzero().view(-1)
    ns = SimpleNamespace(
        data=d, forget_ids=fid,
        train=DataLoader(d.train, batch_sampler=GroupedBatches(torch.isin(d.train.ids, fid), BATCH, 0)),
        forget=loader(forget_ds, BATCH), retain=loader(retain_ds, BATCH, shuffle=True, seed=1),
        fresh_retain=lambda: loader(retain_ds, BATCH, shuffle=True, seed=1),  # the same order every time
        test=loader(d.test, 256), test_r=loader(d.test.subset(other), 256))
    model = make_model("mlp", d.input_shape, d.num_classes, hidden=64)
    ns.init = copy.deepcopy(model)
    ns.recorders = {None: NaiveAmnesiac.recorder(model), 1.0: PartialAmnesiac.recorder(model, keep_ratio=1.0),
                    0.2: UpdateRecorder(model, keep_ratio=0.2)}
    assert ns.recorders[None].keep_ratio is None and PartialAmnesiac.recorder(model).keep_ratio == 0.1
    train(model, ns.train, CFG, recorders=list(ns.recorders.values()))
    ns.model = model
    ns.acc = lambda m: {"forget": accuracy(m, ns.forget), "retain": accuracy(m, ns.retain),
                        "test": accuracy(m, ns.test), "test_r": accuracy(m, ns.test_r)}
    ns.orig = ns.acc(model)
    ns.retrained = unlearn("retrain", copy.deepcopy(model), forget=ns.forget, retain=ns.fresh_retain(),
                           train_config=CFG)
    ns.gold = ns.acc(ns.retrained.model)
    print(f"\n{'original':34s} {_fmt(ns.orig)}\n{'retrain':34s} {_fmt(ns.gold)}")
    assert ns.orig["forget"] > 0.85 and ns.orig["test_r"] > 0.85, "the original model must have learnt digits"
    return ns


def _fmt(a):
    return "  ".join(f"{k} {v:.3f}" for k, v in a.items())


def _run(s, name, label=None, store_ratio="none", **hp):
    store = None if store_ratio == "none" else s.recorders[store_ratio].store
    res = unlearn(name, copy.deepcopy(s.model), forget=s.forget, retain=s.fresh_retain(), store=store, **hp)
    acc = s.acc(res.model)
    stats = {k: v for k, v in res.stats.items() if k in ("steps", "steps_removed", "steps_total", "forget_acc",
                                                           "stopped_early", "finetuned", "bytes_stored",
                                                           "dense_equivalent_bytes")}
    print(f"{label or name:34s} {_fmt(acc)}  {stats}")
    return res, acc


def _forgets(s, acc):
    target = s.orig["forget"] - GAP_CLOSED * (s.orig["forget"] - s.gold["forget"])
    assert acc["forget"] <= target, f"forget accuracy {acc['forget']:.3f} > {target:.3f}"


def _keeps_utility(s, acc, margin):
    assert acc["test_r"] >= s.orig["test_r"] - margin, \
        f"test accuracy on the other classes {acc['test_r']:.3f} < original {s.orig['test_r']:.3f} - {margin}"


# ------------------------------------------------------------------------------------- the API

def test_registry_and_api(s):
    assert set(PAPER_METHODS) <= set(available_methods())
    for name in PAPER_METHODS:
        cls = get_method(name)
        assert cls.name == name and cls.__doc__ and isinstance(cls.defaults, dict)
    assert get_method("partial_label_flip").defaults["keep_ratio"] == 0.1
    assert get_method("partial_label_flip").defaults["selection"] == "magnitude"
    assert get_method("amnesiac").defaults["finetune"] is True
    assert get_method("partial_amnesiac").defaults["finetune"] is False
    assert get_method("optimization").defaults["objective"] == "ascent"
    assert get_method("optimization").defaults["beta"] == 0.0
    with pytest.raises(ValueError, match="unknown method"):
        get_method("nope")
    with pytest.raises(ValueError, match="unknown hyper-parameter"):
        unlearn("label_flip", copy.deepcopy(s.model), forget=s.forget, learning_rate=0.1)
    with pytest.raises(ValueError, match="needs store"):
        unlearn("amnesiac", copy.deepcopy(s.model), forget=s.forget, retain=s.retain)
    with pytest.raises(ValueError, match="needs retain"):
        unlearn("retrain", copy.deepcopy(s.model), forget=s.forget)
    with pytest.raises(ValueError, match="needs retain"):
        unlearn("optimization", copy.deepcopy(s.model), forget=s.forget, objective="regularised_ascent")

    calls = []

    @register_method
    class Nothing(Method):
        """A user's method: records what it was given and leaves the model alone."""
        name = "test_nothing"
        defaults = {"strength": 1.0}

        def _run(self, model, forget, retain, store, hp):
            calls.append(hp["strength"])
            return {"custom": True}

    try:
        model = copy.deepcopy(s.model)
        for how in ("test_nothing", Nothing, Nothing(strength=3.0)):
            res = unlearn(how, model, forget=s.forget, strength=2.0)
            assert isinstance(res, UnlearnResult) and res.model is model
            assert res.stats["custom"] and res.stats["method"] == "test_nothing"
        assert calls == [2.0, 2.0, 2.0]
        with pytest.raises(ValueError, match="already registered"):
            register_method(type("Other", (Method,), {"name": "test_nothing"}))
    finally:
        methods_base._REGISTRY.pop("test_nothing", None)


# ---------------------------------------------------------------------------- Algorithm 1: amnesiac

def test_amnesiac_forgets_and_finetune_repairs(s):
    res, acc = _run(s, "amnesiac", store_ratio=None)
    raw, acc_raw = _run(s, "amnesiac", "amnesiac (no fine-tune)", store_ratio=None, finetune=False)
    assert res.stats["finetuned"] and not raw.stats["finetuned"]
    n_batches = len(s.train)
    assert res.stats["steps_total"] == CFG.epochs * n_batches
    assert res.stats["steps_removed"] == CFG.epochs * math.ceil(len(s.forget_ids) / BATCH)  # the forget batches
    assert res.stats["apply_calls"] == 1 == raw.stats["apply_calls"]  # one batched sparse_accumulate_
    for a in (acc, acc_raw):
        _forgets(s, a)
        assert a["forget"] <= s.gold["forget"] + 0.1
    _keeps_utility(s, acc, margin=0.05)
    assert acc["test_r"] >= acc_raw["test_r"]  # the fine-tune on D_r repairs the removal's damage


def test_partial_amnesiac_forgets_without_finetune(s):
    res, acc = _run(s, "partial_amnesiac", "partial_amnesiac r=0.2", store_ratio=0.2)
    assert not res.stats["finetuned"] and res.stats["store_keep_ratio"] == 0.2
    assert res.stats["bytes_stored"] < 0.5 * res.stats["dense_equivalent_bytes"]
    _forgets(s, acc)
    _keeps_utility(s, acc, margin=0.05)
    raw = copy.deepcopy(s.model)
    s.recorders[None].store.apply(raw, s.recorders[None].store.steps_containing(s.forget_ids))
    assert acc["test_r"] >= s.acc(raw)["test_r"]  # the paper's claim: better kept than naive without fine-tune


def test_partial_amnesiac_at_full_ratio_equals_naive_exactly(s):
    a = unlearn("partial_amnesiac", copy.deepcopy(s.model), forget=s.forget, store=s.recorders[1.0].store)
    b = unlearn("amnesiac", copy.deepcopy(s.model), forget=s.forget, store=s.recorders[None].store, finetune=False)
    assert a.stats["steps_removed"] == b.stats["steps_removed"] > 0
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), name
    assert not torch.equal(next(a.model.parameters()), next(s.model.parameters()))


@pytest.mark.parametrize("name", ["amnesiac", "partial_amnesiac"])
def test_amnesiac_removing_every_step_returns_the_initial_weights(s, name):
    store = s.recorders[None if name == "amnesiac" else 1.0].store
    everything = loader(s.data.train, 256)
    res = unlearn(name, copy.deepcopy(s.model), forget=everything, store=store, finetune=False)
    assert res.stats["steps_removed"] == len(store) == res.stats["steps_total"]
    for (pname, p), q, t in zip(res.model.named_parameters(), s.init.parameters(), s.model.parameters()):
        assert not torch.allclose(q, t, atol=1e-3)  # training did move it
        torch.testing.assert_close(p, q, rtol=1e-4, atol=2e-5, msg=pname)


@pytest.mark.parametrize("name", ["amnesiac", "partial_amnesiac"])
def test_amnesiac_removing_nothing_changes_nothing(s, name):
    """Removing an empty set of steps is the identity; forget ids that no recorded step holds are refused
    (nothing could be removed for them) and the model stays as it was."""
    store = s.recorders[0.2].store
    model = copy.deepcopy(s.model)
    assert store.apply(model, [], alpha=-1.0)["entries"] == 0
    x, y = s.data.test.x[:20], s.data.test.y[:20]
    strangers = loader(IndexedTensorDataset(x, y, ids=torch.arange(20) + 10**6), 8)  # ids never trained on
    with pytest.raises(ValueError, match="appear in no recorded training step"):
        unlearn(name, model, forget=strangers, retain=s.retain, store=store)
    for k, v in s.model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_partial_amnesiac_stores_at_most_k_entries_per_layer_per_step(s):
    store = s.recorders[0.2].store
    numels = store.manifest.numels
    for rec in store.records():
        counts = rec.offsets.diff().tolist()
        assert len(counts) == len(numels)
        for c, n in zip(counts, numels):
            assert c <= ops.keep_count(n, 0.2) == math.ceil(0.2 * n)


# ---------------------------------------------------------- Algorithms 2 and 3: label flip, optimization

GRADIENT = dict(lr=0.01, epochs=20, stop_forget_acc=0.05, stop_every_step=True)


@pytest.mark.parametrize("name,margin", [("label_flip", 0.1), ("partial_label_flip", 0.06),
                                         ("optimization", 0.06), ("partial_optimization", 0.06)])
def test_gradient_methods_forget_and_keep_utility(s, name, margin):
    res, acc = _run(s, name, f"{name} lr=0.01 stop<=0.05", **GRADIENT)
    assert res.stats["stopped_early"] and not res.stats["diverged"]
    assert res.stats["forget_acc"] <= 0.05 and acc["forget"] == pytest.approx(res.stats["forget_acc"])
    _forgets(s, acc)
    _keeps_utility(s, acc, margin)


def test_toy_partial_label_flip_ends_above_naive_on_this_one_seed(s):
    """A pin of this toy's behaviour, NOT evidence for the paper's Algorithm-2 claim: one seed of a hand-set
    toy (digits, one class forgotten, grouped batches, lr 0.01, stop at FA <= 0.05), where partial label flip
    ends at least 1 point of test_r above naive label flip — and the two stop at different forget
    accuracies, so this is not even equal forgetting. At equal forgetting over 3 seeds on the whole
    Fashion-MNIST the partial variant ends within 0.007 TA of the naive one
    (benchmarks/results/equal_forgetting.md). A change in either method moves this toy's figures."""
    _, naive = _run(s, "label_flip", "label_flip (again)", **GRADIENT)
    _, partial = _run(s, "partial_label_flip", "partial_label_flip (again)", **GRADIENT)
    assert partial["test_r"] >= naive["test_r"] + 0.01


def test_stop_at_the_original_models_test_accuracy(s):
    res, acc = _run(s, "partial_optimization", "partial_opt stop=original_test", lr=0.01, epochs=20,
                    stop_forget_acc="original_test", test_loader=s.test, stop_every_step=True)
    assert res.stats["target_forget_acc"] == pytest.approx(s.orig["test"])
    assert res.stats["stopped_early"] and acc["forget"] <= s.orig["test"]
    assert res.stats["steps"] >= 1
    already = unlearn("partial_optimization", copy.deepcopy(s.model), forget=s.forget, lr=0.01,
                      stop_forget_acc=1.0)  # already at the target: untouched
    assert already.stats["steps"] == 0
    for p, q in zip(already.model.parameters(), s.model.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="test_loader"):
        unlearn("label_flip", copy.deepcopy(s.model), forget=s.forget, stop_forget_acc="original_test")


def test_label_flip_never_assigns_the_true_label(s, monkeypatch):
    seen = {}
    original_call = FlippedLabels.__call__

    def spy(self, y, ids, num_classes):
        out = original_call(self, y, ids, num_classes)
        for i, t, f in zip(ids.tolist(), y.tolist(), out.tolist()):
            assert f != t and 0 <= f < num_classes
            assert seen.setdefault(i, f) == f  # fixed per sample for the run
        return out

    monkeypatch.setattr(label_flip_module.FlippedLabels, "__call__", spy)
    forget = loader(s.forget.dataset, 16, shuffle=True, seed=3)  # other batches each epoch
    for name in ("label_flip", "partial_label_flip"):
        seen.clear()
        res = unlearn(name, copy.deepcopy(s.model), forget=forget, epochs=3, lr=1e-3)
        assert res.stats["steps"] == 3 * len(forget)
        assert len(seen) == len(s.forget_ids)
    monkeypatch.undo()
    # The wrong label is uniform over the other classes.
    gen = FlippedLabels(seed=1)
    y = torch.arange(20000) % 10
    flipped = gen(y, torch.arange(20000), 10)
    assert not (flipped == y).any()
    offsets = torch.bincount((flipped - y) % 10, minlength=10)
    assert offsets[0] == 0 and offsets[1:].min() > 0.9 * 20000 / 9 and offsets[1:].max() < 1.1 * 20000 / 9


@pytest.mark.parametrize("name", ["partial_label_flip", "partial_optimization"])
@pytest.mark.parametrize("selection", ["magnitude", "random", "round_robin"])
def test_partial_variants_change_at_most_k_entries_per_layer_per_step(s, name, selection):
    ratio = 0.05
    model = copy.deepcopy(s.model)
    params = list(model.parameters())
    before, steps = [], []

    def pre(opt, args, kwargs):
        assert isinstance(opt, PartialSGD)
        before[:] = [p.detach().clone() for p in params]

    def post(opt, args, kwargs):
        changed = [int((p.detach() != b).sum()) for p, b in zip(params, before)]
        for c, p in zip(changed, params):
            assert c <= math.ceil(ratio * p.numel()) == ops.keep_count(p.numel(), ratio)
        steps.append(changed)

    handles = [register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)]
    try:
        res = unlearn(name, model, forget=s.forget, epochs=2, lr=0.01, keep_ratio=ratio, selection=selection)
    finally:
        for h in handles:
            h.remove()
    assert len(steps) == res.stats["steps"] == 2 * len(s.forget)
    assert sum(map(sum, steps)) > 0  # and something did move


def test_naive_variants_update_every_coordinate_with_a_gradient(s):
    for name in ("label_flip", "optimization"):
        model = copy.deepcopy(s.model)
        unlearn(name, model, forget=s.forget, epochs=1, lr=0.01)
        moved = sum(int((p != q).sum()) for p, q in zip(model.parameters(), s.model.parameters()))
        assert moved > 0.5 * sum(p.numel() for p in model.parameters())


def test_optimization_objectives(s):
    # kl_uniform pushes forget predictions toward uniform: the KL to uniform shrinks.
    def kl_to_uniform(m):
        with torch.no_grad():
            logp = F.log_softmax(m(s.data.train.x[s.forget_ids]), 1)
        return float((-math.log(10) - logp.mean(1)).mean())

    res = unlearn("optimization", copy.deepcopy(s.model), forget=s.forget, objective="kl_uniform", lr=0.01,
                  epochs=2)
    assert kl_to_uniform(res.model) < 0.5 * kl_to_uniform(s.model)
    # regularised_ascent and β > 0 draw retain batches; a callable objective gets them when retain is given.
    got = []

    def mine(out_f, y_f, out_r, y_r, hp):
        got.append(out_r is not None)
        return F.cross_entropy(out_f, y_f)

    unlearn("optimization", copy.deepcopy(s.model), forget=s.forget, retain=s.retain, objective=mine, epochs=1)
    assert got and all(got)
    res = unlearn("partial_optimization", copy.deepcopy(s.model), forget=s.forget, retain=s.retain,
                  objective="regularised_ascent", epochs=1, lr=0.01)
    assert res.stats["steps"] == len(s.forget)
    res = unlearn("optimization", copy.deepcopy(s.model), forget=s.forget, retain=s.retain, beta=0.5, epochs=1)
    assert res.stats["steps"] == len(s.forget)
    with pytest.raises(ValueError, match="objective"):
        unlearn("optimization", copy.deepcopy(s.model), forget=s.forget, objective="nope")


# ------------------------------------------------------------------------------------ Retrain and FT

def test_retrain_is_the_reference(s):
    _forgets(s, s.gold)
    assert s.gold["forget"] <= 0.05  # the class was never seen
    _keeps_utility(s, s.gold, margin=0.03)
    assert s.retrained.stats["steps"] == CFG.epochs * len(s.retain)
    short = TrainConfig(epochs=1, batch_size=BATCH)
    a, b = (unlearn("retrain", copy.deepcopy(s.model), forget=s.forget, retain=s.fresh_retain(), train_config=short)
            for _ in range(2))
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)  # seeded: the same fresh init (and, given the same batches, the same run)


def test_finetune(s):
    res, acc = _run(s, "finetune")
    assert res.stats["finetune_epochs"] == 2 and res.stats["finetune_steps"] == 2 * len(s.retain)
    assert acc["forget"] < s.orig["forget"]  # catastrophic forgetting only: FT is the weak baseline
    _keeps_utility(s, acc, margin=0.03)
