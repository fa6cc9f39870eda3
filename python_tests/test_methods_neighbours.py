"""Deep Unlearn's baselines and SFR-on (docs/algorithms.md#neighbouring-methods) on sklearn digits with tiny
models: each test pins the property that defines its method (what moves, what must not, which way the loss
goes). The update rules themselves are pinned against transcriptions of the original code in
test_methods_pinned.py."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unlearn_ext import ops
from unlearn_ext.data import forget_ids, load_digits, loader, split_forget
from unlearn_ext.methods import available_methods, unlearn
from unlearn_ext.methods import schedules
from unlearn_ext.methods.baselines import distillation, last_blocks, relabelling, sfron
from unlearn_ext.models import make_model
from unlearn_ext.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")

NEIGHBOURS = ("ga", "ng_plus", "srl", "salun", "msg", "ct", "scrub", "bad_teacher", "cfk", "euk", "fisher",
              "influence", "certified", "sfron")


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def data():
    splits = load_digits()
    forget, retain = split_forget(splits.train, forget_ids(splits.train, ratio=0.1, seed=0))
    return {"forget": loader(forget, 64), "retain": loader(retain, 128, shuffle=True), "splits": splits,
            "forget_set": forget, "retain_set": retain}


@pytest.fixture(scope="module")
def small(data):
    """A smaller split for the conv model: 32 forget and 256 retain samples."""
    forget, retain = data["forget_set"].subset(torch.arange(32)), data["retain_set"].subset(torch.arange(256))
    return {"forget": loader(forget, 32), "retain": loader(retain, 64, shuffle=True), "forget_set": forget,
            "retain_set": retain}


@pytest.fixture(scope="module")
def mlp(data):
    torch.manual_seed(0)
    model = make_model("mlp", (1, 8, 8), 10, hidden=64)
    train(model, loader(data["splits"].train, 128, shuffle=True), TrainConfig(epochs=8, lr=3e-3))
    return model


@pytest.fixture(scope="module")
def resnet(small):
    """ResNet-9 at width 4, one epoch (the conv tests need conv kernels and BatchNorm statistics, not skill)."""
    torch.manual_seed(0)
    model = make_model("resnet9", (1, 8, 8), 10, width=4)
    train(model, small["retain"], TrainConfig(epochs=1, lr=3e-3))
    return model


def _clone(model):
    return copy.deepcopy(model)


def _loss(model, data_loader):
    model.eval()
    with torch.no_grad():
        return sum(F.cross_entropy(model(x), y, reduction="sum").item() for x, y, _ in data_loader) / sum(
            len(y) for _, y, _ in data_loader)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------ registry

def test_every_neighbour_is_registered():
    assert set(NEIGHBOURS) <= set(available_methods())


def test_unknown_hyper_parameter_is_rejected(mlp, data):
    with pytest.raises(ValueError, match="unknown hyper-parameter"):
        unlearn("ga", _clone(mlp), forget=data["forget"], no_such=1)


# ------------------------------------------------------------------------------------------ GA, NG+

def test_ga_increases_forget_loss(mlp, data):
    model = _clone(mlp)
    before = _loss(model, data["forget"])
    res = unlearn("ga", model, forget=data["forget"], epochs=2, lr=0.01)
    assert res.stats["steps"] == 2 * len(data["forget"])
    assert _loss(model, data["forget"]) > 1.2 * before


def test_ng_plus_step_is_the_stated_objective_with_frozen_batchnorm(resnet, small):
    """One step, momentum 0: θ₁ = θ₀ − lr·∇[α ℓ_r + α(wd/2)‖θ−θ₀‖² − (1−α) ℓ_f] at θ₀ (the proximal term's
    gradient vanishes at θ₀) computed in eval mode; BatchNorm running statistics do not move."""
    retain = loader(small["retain_set"].subset(torch.arange(64)), 64)
    forget = small["forget"]
    model, ref = _clone(resnet), _clone(resnet).eval()
    alpha, lr = 0.7, 0.05
    xr, yr, _ = next(iter(retain))
    xf, yf, _ = next(iter(forget))
    loss = alpha * F.cross_entropy(ref(xr), yr) - (1 - alpha) * F.cross_entropy(ref(xf), yf)
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    unlearn("ng_plus", model, forget=forget, retain=retain, epochs=1, lr=lr, momentum=0.0, alpha=alpha,
            weight_decay=0.1)
    for p, p0, g in zip(model.parameters(), resnet.parameters(), grads):
        torch.testing.assert_close(p, p0 - lr * g, rtol=1e-4, atol=1e-6)
    for (name, b), b0 in zip(model.named_buffers(), resnet.buffers()):
        assert torch.equal(b, b0), name


# ------------------------------------------------------------------------------------------ SRL, SalUn

def test_srl_redraws_forget_labels_every_epoch(mlp, data, monkeypatch):
    seen = []
    original = relabelling.relabel_forget

    def spy(y, ids, forget_set_ids, k, gen):
        out = original(y, ids, forget_set_ids, k, gen)
        seen.append((ids.clone(), y.clone(), out.clone()))
        return out
    monkeypatch.setattr(relabelling, "relabel_forget", spy)
    epochs = 4
    unlearn("srl", _clone(mlp), forget=data["forget"], retain=data["retain"], epochs=epochs, lr=0.01)
    ids = torch.cat([s[0] for s in seen])
    true, given = torch.cat([s[1] for s in seen]), torch.cat([s[2] for s in seen])
    is_forget = torch.isin(ids, data["forget_set"].ids)
    assert torch.equal(given[~is_forget], true[~is_forget])  # retain labels untouched
    n_forget = len(data["forget_set"])
    assert int(is_forget.sum()) == epochs * n_forget  # every forget sample once per epoch
    per_sample = {}
    for i, label in zip(ids[is_forget].tolist(), given[is_forget].tolist()):
        per_sample.setdefault(i, []).append(label)
    redrawn = sum(len(set(labels)) > 1 for labels in per_sample.values())
    assert redrawn > 0.9 * n_forget  # 4 draws from 10 classes all equal: probability 1e-3 per sample
    assert given[is_forget].unique().numel() == 10  # uniform over all classes, true one included


def test_salun_mask_is_the_global_top_fraction(mlp, data):
    model = _clone(mlp)
    threshold = 0.3
    masks = relabelling.SalUn.saliency_mask(model, data["forget"], threshold)
    model.zero_grad()
    for x, y, _ in data["forget"]:
        (-F.cross_entropy(model(x), y)).backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).abs()
    m = torch.cat([mask.reshape(-1) for mask in masks])
    assert int(m.sum()) == ops.keep_count(g.numel(), threshold)
    assert g[m].min() >= g[~m].max()
    # per layer the fractions differ (a global, not a layer-wise, selection)
    fractions = [float(mask.float().mean()) for mask in masks]
    assert max(fractions) - min(fractions) > 0.1


def test_salun_moves_only_masked_weights_when_frozen(mlp, data):
    """freeze_unmasked=True: masked-out weights stay bitwise even with momentum and weight decay; the
    original's grad·mask then SGD step (the default) lets weight decay move them."""
    masks = relabelling.SalUn.saliency_mask(_clone(mlp), data["forget"], 0.5)
    hp = dict(epochs=1, lr=0.01, momentum=0.9, weight_decay=5e-4, threshold=0.5)
    for freeze in (True, False):
        model = _clone(mlp)
        res = unlearn("salun", model, forget=data["forget"], retain=data["retain"], freeze_unmasked=freeze, **hp)
        assert res.stats["mask_fraction"] == pytest.approx(0.5, abs=1e-4)
        outside = sum(int((p != p0)[~m].sum()) for p, p0, m in zip(model.parameters(), mlp.parameters(), masks))
        inside = sum(int((p != p0)[m].sum()) for p, p0, m in zip(model.parameters(), mlp.parameters(), masks))
        assert inside > 0
        assert (outside == 0) if freeze else (outside > 0.5 * sum(int((~m).sum()) for m in masks))


# ------------------------------------------------------------------------------------------ MSG, CT

def test_msg_reinitialises_exactly_the_smallest_gradient_fraction_of_each_conv(resnet, small):
    model = _clone(resnet)
    p = 0.3
    res = unlearn("msg", model, forget=small["forget"], retain=small["retain"], epochs=0, init_rate=p)
    convs = {id(m.weight) for m in resnet.modules() if isinstance(m, nn.Conv2d)}
    counts = []
    for (name, w), w0 in zip(model.named_parameters(), resnet.parameters()):
        changed = int((w != w0).sum())
        if id(w0) in convs:
            assert changed == math.ceil(p * w.numel()) == ops.keep_count(w.numel(), p), name
            counts.append(changed)
        else:
            assert changed == 0, name
    assert res.stats["reinitialised"] == counts


def test_msg_mask_is_the_smallest_gradient_entries():
    torch.manual_seed(0)
    g = [torch.randn(8, 3, 3, 3), torch.randn(4, 8, 3, 3)]
    for mask, x in zip(ops.layerwise_topk_mask(g, 0.3, largest=False), g):
        assert x.abs()[mask].max() <= x.abs()[~mask].min()


def test_triangular_lr_rises_then_falls():
    lr = schedules.triangular(1.0, 5)  # 6 steps, 3 of warm-up
    assert [round(lr(e), 6) for e in range(5)] == [round(v, 6) for v in (1 / 3, 2 / 3, 1.0, 2 / 3, 1 / 3)]


def test_msg_fine_tunes_with_the_damped_update(resnet, small):
    model = _clone(resnet)
    res = unlearn("msg", model, forget=small["forget"], retain=small["retain"], epochs=1, lr=1e-3)
    assert res.stats["steps"] == len(small["retain"])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_ct_transposes_every_conv_kernel(resnet, small):
    model = _clone(resnet)
    res = unlearn("ct", model, forget=small["forget"], retain=small["retain"], epochs=0)
    n = 0
    for m, m0 in zip(model.modules(), resnet.modules()):
        for (name, p), p0 in zip(m.named_parameters(recurse=False), m0.parameters(recurse=False)):
            if isinstance(m, nn.Conv2d) and name == "weight":
                assert torch.equal(p, p0.transpose(2, 3))
                assert not torch.equal(p, p0)
                n += 1
            else:
                assert torch.equal(p, p0)
    assert res.stats["transposed"] == n == 8


def test_ct_then_fine_tunes(resnet, small):
    model = _clone(resnet)
    res = unlearn("ct", model, forget=small["forget"], retain=small["retain"], epochs=1)
    assert res.stats["steps"] == len(small["retain"])


def test_conv_methods_need_a_conv(mlp, data):
    for name in ("ct", "msg"):
        with pytest.raises(ValueError, match="Conv2d"):
            unlearn(name, _clone(mlp), forget=data["forget"], retain=data["retain"], epochs=0)


# ------------------------------------------------------------------------------------------ SCRUB, Bad Teacher

def _kl_to(teacher, student, data_loader):
    teacher.eval(), student.eval()
    with torch.no_grad():
        return sum(F.kl_div(F.log_softmax(student(x), 1), F.softmax(teacher(x), 1), reduction="sum").item()
                   for x, _, _ in data_loader) / len(data_loader.dataset)


def test_scrub_max_steps_push_the_student_away_from_the_teacher_on_forget(mlp, data):
    hp = dict(epochs=1, gamma=0.0, alpha=0.0, momentum=0.0, weight_decay=0.0, lr=0.05)
    idle = _clone(mlp)  # no max epoch and a zero retain objective: nothing moves
    res = unlearn("scrub", idle, forget=data["forget"], retain=data["retain"], max_epochs=0, **hp)
    assert res.stats["max_steps"] == 0 and res.stats["min_steps"] == len(data["retain"])
    assert all(torch.equal(p, p0) for p, p0 in zip(idle.parameters(), mlp.parameters()))
    # The KL's gradient vanishes while student == teacher, so the min steps break the tie; with max steps
    # the student ends farther from the teacher on D_f than with min steps alone.
    hp = dict(epochs=5, lr=0.01, lr_decay_rate=1.0)
    kl = {}
    for max_epochs in (0, 5):
        model = _clone(mlp)
        res = unlearn("scrub", model, forget=data["forget"], retain=data["retain"], max_epochs=max_epochs, **hp)
        assert res.stats["max_steps"] == max_epochs * len(data["forget"])
        kl[max_epochs] = _kl_to(mlp, model, data["forget"])
    assert kl[5] > 3 * kl[0]


def test_scrub_runs_with_defaults_on_few_epochs(mlp, data):
    model = _clone(mlp)
    res = unlearn("scrub", model, forget=data["forget"], retain=data["retain"], epochs=2, max_epochs=1)
    assert res.stats["steps"] == len(data["forget"]) + 2 * len(data["retain"])


def test_bad_teacher_follows_the_incompetent_teacher_on_forget_only(mlp, data):
    train_set = data["splits"].train
    forget, retain = split_forget(train_set, forget_ids(train_set, cls=3))  # a class: learnable apart
    data = {"forget": loader(forget, 64), "retain": loader(retain, 128, shuffle=True)}
    model = _clone(mlp)
    unlearn("bad_teacher", model, forget=data["forget"], retain=data["retain"], epochs=2)
    bad = distillation.reinitialised_copy(mlp, 0)  # the method's incompetent teacher (same seed)
    assert _kl_to(bad, model, data["forget"]) < _kl_to(mlp, model, data["forget"])
    assert _kl_to(mlp, model, data["retain"]) < _kl_to(bad, model, data["retain"])


# ------------------------------------------------------------------------------------------ CF-k, EU-k

def test_blocks_follow_the_originals_stages(resnet, mlp):
    """torchvision ResNet-18: the stem and layer1…layer4 (Deep Unlearn's k = 1 trains layer4 + fc); ResNet-9:
    its six stages; LeNet: each conv and hidden linear layer; MLP: each hidden layer; SimpleViT: each
    encoder layer. The classifier (last Linear) is never a block."""
    r18 = make_model("resnet18", (3, 8, 8), 10)
    bl = last_blocks.blocks(r18)
    assert [b[0] for b in bl] == [r18.conv1, r18.layer1, r18.layer2, r18.layer3, r18.layer4]
    assert bl[0] == [r18.conv1, r18.bn1] and last_blocks.classifier(r18) is r18.fc
    assert [b[0] for b in last_blocks.blocks(resnet)] == [resnet.prep, resnet.layer1, resnet.res1, resnet.layer2,
                                                          resnet.layer3, resnet.res3]
    lenet = make_model("lenet", (1, 8, 8), 10)
    convs = [m for m in lenet.features if isinstance(m, nn.Conv2d)]
    linears = [m for m in lenet.classifier if isinstance(m, nn.Linear)]
    assert [b for b in last_blocks.blocks(lenet)] == [[c] for c in convs + linears[:-1]]
    assert last_blocks.blocks(mlp) == [[mlp[1]], [mlp[3]]] and last_blocks.classifier(mlp) is mlp[5]
    vit = make_model("simplevit", (1, 8, 8), 10, dim=16, depth=3, heads=2, mlp_dim=32)
    vb = last_blocks.blocks(vit)
    assert [b[0] for b in vb[1:]] == list(vit.encoder.layers) and vb[-1][1] is vit.encoder.norm


@pytest.mark.parametrize("name", ["cfk", "euk"])
def test_last_k_blocks_only(resnet, small, name):
    """Only the last k blocks and the classifier move; the whole model runs in eval mode, so no BatchNorm
    statistic moves (the original's ``model.eval()``); requires_grad flags are restored."""
    model = _clone(resnet)
    flags = [p.requires_grad for p in model.parameters()]
    res = unlearn(name, model, forget=small["forget"], retain=small["retain"], k=1, epochs=1, lr=0.01)
    trained = {id(t): t for m in last_blocks.blocks(model)[-1] + [last_blocks.classifier(model)]
               for t in m.parameters()}
    assert model.res3[0].weight is not None and id(model.res3[0].weight) in trained  # k = 1: the last stage
    after, before = model.state_dict(keep_vars=True), resnet.state_dict()
    for key, value in after.items():
        # trained parameters move; frozen ones and every BatchNorm statistic (eval mode) stay
        assert torch.equal(value, before[key]) != (id(value) in trained), key
    assert [p.requires_grad for p in model.parameters()] == flags
    assert res.stats["trained_parameters"] == sum(t.numel() for t in trained.values())
    assert res.stats["steps"] == len(small["retain"])


def test_euk_reinitialises_the_last_blocks_with_deep_unlearns_init(resnet, small):
    model = _clone(resnet)
    unlearn("euk", model, forget=small["forget"], retain=small["retain"], k=1, epochs=0, seed=3)
    fresh = _clone(resnet)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        last_blocks.deep_unlearn_init_([fresh.res3, fresh.head[-1]])
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), fresh.state_dict().values()))
    bn = model.res3[1]
    assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.equal(bn.bias, torch.zeros_like(bn.bias))
    assert torch.equal(bn.running_mean, resnet.res3[1].running_mean)  # statistics kept, as in the original
    assert not torch.equal(model.head[-1].weight, resnet.head[-1].weight)
    assert torch.equal(model.layer3[0].weight, resnet.layer3[0].weight)


def test_k_out_of_range(mlp, data):
    with pytest.raises(ValueError, match=r"k must be in \[1, 2\]"):
        unlearn("cfk", _clone(mlp), forget=data["forget"], retain=data["retain"], k=3)
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        unlearn("cfk", _clone(mlp), forget=data["forget"], retain=data["retain"], k=0)


# ------------------------------------------------------------------------------------------ Fisher, influence

def test_fisher_noise_scales_with_sqrt_alpha(mlp, data):
    """θ ← θ + sqrt(α·c(F))·z with z from the seed: four times α doubles the perturbation, exactly."""
    retain = loader(data["retain_set"].subset(torch.arange(256)), 128)
    deltas = []
    for alpha in (1e-6, 4e-6):
        model = _clone(mlp)
        unlearn("fisher", model, forget=data["forget"], retain=retain, alpha=alpha, seed=5, batch_size=128)
        deltas.append([p - p0 for p, p0 in zip(model.parameters(), mlp.parameters())])
    for d1, d4 in zip(*deltas):
        torch.testing.assert_close(d4, 2 * d1, rtol=1e-3, atol=1e-6)
    assert any(bool((d != 0).any()) for d in deltas[0])


def test_fisher_noise_is_smaller_where_retain_fisher_is_larger(mlp, data):
    """Per row the variance is α / mean(F) (clamped): rows with more retain information get less noise."""
    retain = loader(data["retain_set"].subset(torch.arange(256)), 128)
    model = _clone(mlp)
    unlearn("fisher", model, forget=data["forget"], retain=retain, alpha=1e-4, seed=0, batch_size=128)
    w, w0 = model[1].weight, mlp[1].weight  # first hidden layer: 64 rows
    noise_std = (w - w0).std(dim=1)
    fisher = torch.zeros_like(w0)
    mlp.eval()
    for x, _, _ in retain:
        out = mlp(x)
        prob = F.softmax(out, 1).detach().mean(0)
        for c in range(10):
            g, = torch.autograd.grad(F.cross_entropy(out, torch.full((len(x),), c)), [mlp[1].weight],
                                     retain_graph=True)
            fisher += prob[c] * g * g
    informative = fisher.mean(1) > fisher.mean(1).median()
    assert noise_std[informative].mean() < noise_std[~informative].mean()


@pytest.mark.parametrize("inverse", ["woodfisher", "lissa"])
def test_influence_increases_forget_loss_and_is_linear_in_alpha(mlp, data, inverse):
    retain = loader(data["retain_set"].subset(torch.arange(256)), 128)
    hp = dict(inverse=inverse, depth=30, repeats=1, scale=200.0, damping=0.1, lissa_batch_size=64, seed=1,
              woodfisher_samples=100)
    steps = []
    for alpha in (1.0, 3.0):
        model = _clone(mlp)
        res = unlearn("influence", model, forget=data["forget"], retain=retain, alpha=alpha, **hp)
        steps.append([p - p0 for p, p0 in zip(model.parameters(), mlp.parameters())])
        assert res.stats["step_norm"] > 0
    for s1, s3 in zip(*steps):
        torch.testing.assert_close(s3, 3 * s1, rtol=1e-4, atol=1e-7)
    model = _clone(mlp)
    unlearn("influence", model, forget=data["forget"], retain=retain, alpha=50.0, **hp)
    assert _loss(model, data["forget"]) > _loss(mlp, data["forget"])


# ------------------------------------------------------------------------------------------ SFR-on

def test_sfron_mask_is_the_fisher_ratio(mlp, data):
    model = _clone(mlp)
    gamma = 2.0
    retain = loader(data["retain_set"], 128)  # fixed batches: the statistic is over batch-mean gradients
    masks = sfron.fisher_ratio_mask(model, data["forget"], retain, gamma)
    params = list(model.parameters())
    f_f = sfron.fisher_diagonal(model, data["forget"], params)
    f_r = sfron.fisher_diagonal(model, retain, params)
    for m, ff, fr in zip(masks, f_f, f_r):
        assert torch.equal(m, (ff + 1e-15) / (fr + 1e-15) >= gamma)
    frac = sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)
    assert 0 < frac < 1


def test_sfron_weighted_forget_loss():
    losses = torch.tensor([0.1, 1.0, 3.0, 0.5])
    w = 1.0 / losses.pow(0.5)
    assert float(sfron.weighted_forget_loss(losses, 0.5)) == pytest.approx(float(-(w / w.sum() * losses).sum()),
                                                                            rel=1e-5)
    assert int(torch.argmax(w)) == 0  # the lowest-loss (best remembered) sample weighs most


def test_sfron_interleaves_forget_and_retain_steps(mlp, data):
    model = _clone(mlp)
    before = _loss(model, data["forget"])
    res = unlearn("sfron", model, forget=data["forget"], retain=data["retain"], steps=30, forget_every=3)
    assert res.stats["forget_steps"] == 10 and res.stats["steps"] == 30
    assert 0 < res.stats["mask_fraction"] < 1
    assert _loss(model, data["forget"]) > before
