"""README.md's snippet of the ops and the partial optimizers runs as written: on a small model one SGD step past
`before`, it prunes that step to each layer's top 10 % and subtracts it (those entries go back to `before`, the
others keep the step), masks each layer's smallest 10 % of gradients, and builds a PartialSGD whose step moves at
most 10 % of each layer."""
import math
import warnings

import pytest
import torch
from torch import nn

warnings.filterwarnings("ignore", message="unlearn_ext: compiled kernels not loaded")

from readme_snippets import ops_snippet  # noqa: E402
from unlearn_ext.optim import PartialSGD  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_ops_snippet_runs_as_written():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    before = [p.detach().clone() for p in model.parameters()]
    nn.functional.cross_entropy(model(torch.randn(8, 6)), torch.randint(0, 3, (8,))).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad  # the step the snippet prunes and undoes
    stepped = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]

    ns = {"model": model, "before": before}
    exec(ops_snippet(), ns)

    for p, b, s, g, mask in zip(model.parameters(), before, stepped, grads, ns["masks"]):
        k = math.ceil(0.1 * p.numel())
        undone = p.detach() != s
        assert int(undone.sum()) == k
        torch.testing.assert_close(p.detach()[undone], b[undone])  # back to before where the top k were
        step = (s - b).abs()
        assert step[undone].min() >= step[~undone].max()  # the k largest entries of the step
        assert int(mask.sum()) == k and g.abs()[mask].max() <= g.abs()[~mask].min()  # the smallest gradients

    opt = ns["opt"]
    assert isinstance(opt, PartialSGD)
    undone_state = [p.detach().clone() for p in model.parameters()]
    opt.step()
    for p, q in zip(model.parameters(), undone_state):
        assert 0 < int((p.detach() != q).sum()) <= math.ceil(0.1 * p.numel())
