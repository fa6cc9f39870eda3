"""The NeurIPS 2023 Machine Unlearning challenge contract, ``unlearning(net, retain, forget, validation) ->
net``, adapted onto :func:`unlearn_ext.unlearn` (unlearn_ext.compat), on digits with plain ``(x, y)`` and
dict loaders."""
import copy
import warnings

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

warnings.filterwarnings("ignore", message="unlearn_ext: compiled kernels not loaded")

from unlearn_ext.compat import unlearning, with_ids  # noqa: E402
from unlearn_ext.data import forget_ids, load_digits, loader, split_forget  # noqa: E402
from unlearn_ext.metrics import accuracy  # noqa: E402
from unlearn_ext.models import make_model  # noqa: E402
from unlearn_ext.train import TrainConfig, train  # noqa: E402


class DictDataset(Dataset):
    """Samples as the challenge's face data has them: {"image", "age_group", ...}."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i], "age_group": int(self.y[i]), "person_id": f"p{i}"}


@pytest.fixture(scope="module")
def setup():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model; avoids OpenMP spinning on a shared machine
    torch.manual_seed(0)
    d = load_digits()
    forget_ds, retain_ds = split_forget(d.train, forget_ids(d.train, cls=0))
    net = make_model("mlp", d.input_shape, d.num_classes, hidden=32)
    train(net, loader(d.train, 64, shuffle=True, seed=0), TrainConfig(epochs=15, batch_size=64))
    pairs = {name: TensorDataset(ds.x, ds.y) for name, ds in
             (("forget", forget_ds), ("retain", retain_ds), ("validation", d.test))}
    yield d, net, pairs
    torch.set_num_threads(n)


def _loaders(pairs, dicts=False):
    make = (lambda ds: DictDataset(*ds.tensors)) if dicts else (lambda ds: ds)
    return (DataLoader(make(pairs["retain"]), batch_size=64, shuffle=True),
            DataLoader(make(pairs["forget"]), batch_size=64, shuffle=True),
            DataLoader(make(pairs["validation"]), batch_size=256))


def _acc(net, ds):
    return accuracy(net, with_ids(DataLoader(ds, batch_size=256)))


@pytest.mark.parametrize("dicts", [False, True])
def test_unlearning_contract_default_method(setup, dicts):
    _, trained, pairs = setup
    net = copy.deepcopy(trained)
    retain, forget, validation = _loaders(pairs, dicts)
    val_acc = _acc(trained, pairs["validation"])
    assert _acc(trained, pairs["forget"]) > val_acc  # the forget class is known better than average
    out = unlearning(net, retain, forget, validation, lr=0.01, epochs=10, stop_every_step=True)
    assert out is net  # in place, returned
    # Default: layer-wise partial gradient ascent, stopped once forget accuracy <= the original validation acc.
    assert _acc(net, pairs["forget"]) <= val_acc
    assert _acc(net, pairs["retain"]) > 0.8


@pytest.mark.parametrize("method,hp", [("label_flip", dict(lr=0.01)), ("finetune", {}),
                                       ("partial_label_flip", dict(lr=0.01, stop_forget_acc=None, epochs=1))])
def test_unlearning_contract_other_methods(setup, method, hp):
    _, trained, pairs = setup
    net = copy.deepcopy(trained)
    out = unlearning(net, *_loaders(pairs), method=method, **hp)
    assert out is net
    assert any(not torch.equal(p, q) for p, q in zip(net.parameters(), trained.parameters()))


def test_unlearning_contract_errors(setup):
    _, trained, pairs = setup
    with pytest.raises(ValueError, match="needs store"):
        unlearning(copy.deepcopy(trained), *_loaders(pairs), method="amnesiac")
    with pytest.raises(ValueError, match="unknown method"):
        unlearning(copy.deepcopy(trained), *_loaders(pairs), method="nope")
    with pytest.raises(TypeError):
        unlearning(copy.deepcopy(trained), [(torch.zeros(1, 8, 8), 0)], *_loaders(pairs)[1:])


def test_with_ids(setup):
    d, _, pairs = setup
    base = DataLoader(pairs["forget"], batch_size=16, shuffle=True, collate_fn=None)
    wrapped = with_ids(base, first_id=100)
    assert wrapped.batch_sampler is base.batch_sampler and len(wrapped) == len(base)
    ids = torch.cat([i for _, _, i in wrapped])
    assert sorted(ids.tolist()) == list(range(100, 100 + len(pairs["forget"])))
    xs, ys = pairs["forget"].tensors
    for x, y, i in wrapped:  # ids name the dataset's samples
        assert torch.equal(x, xs[i - 100]) and torch.equal(y, ys[i - 100])
    # Retain ids follow the forget ids in the adapter: disjoint.
    retain, forget, _ = _loaders(pairs)
    f_ids = torch.cat([i for *_, i in with_ids(forget)])
    r_ids = torch.cat([i for *_, i in with_ids(retain, first_id=len(forget.dataset))])
    assert not torch.isin(f_ids, r_ids).any()
    # Dicts: input and label read by key, torch's default collate.
    x, y, i = next(iter(with_ids(DataLoader(DictDataset(*pairs["forget"].tensors), batch_size=8))))
    assert x.shape == (8, 1, 8, 8) and y.dtype == torch.int64 and i.tolist() == list(range(8))
    # (x, y, id) loaders pass through unchanged; None stays None.
    triples = loader(d.train, 32)
    assert with_ids(triples) is triples and with_ids(None) is None
    with pytest.raises(ValueError, match="input key"):
        with_ids(DataLoader([{"pixels": torch.zeros(2), "age_group": 1}], batch_size=1))
    with pytest.raises(ValueError, match="samples must be"):
        with_ids(DataLoader([(torch.zeros(2), 1, 2, 3)], batch_size=1))
