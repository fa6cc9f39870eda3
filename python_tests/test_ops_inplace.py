"""The in-place ops (sparse_accumulate_, masked_sgd_, masked_adam_) as autograd sees them: every tensor they
write gets its version counter bumped like torch's own in-place ops (so a backward that saved it raises
instead of returning a wrong gradient), and a leaf that requires grad is refused under grad mode. Each
runs on the active back-end (set UNLEARN_EXT_BACKEND=reference for the reference) and, where a GPU is
visible, on CUDA."""
import pytest
import torch

from unlearn_ext import ops

INDEX = torch.tensor([0], dtype=torch.int32)


def _accumulate(dense):
    dev = dense[0].device
    ops.sparse_accumulate_(dense, torch.full((len(dense),), 100.0, device=dev), INDEX.repeat(len(dense)).to(dev),
                           torch.arange(len(dense) + 1, device=dev), 1.0)


def _sgd(params, bufs):
    ops.masked_sgd_(params, [torch.ones_like(p) for p in params], bufs, None, 1.0, lr=0.5, momentum=0.9)


def _adam(params, m1, m2):
    ops.masked_adam_(params, [torch.ones_like(p) for p in params], m1, m2, None, 1.0, lr=0.5)


# ---- version counters and autograd -----------------------------------------------------------------------

CALLS = {
    "sparse_accumulate_": lambda w, s: _accumulate([w]),
    "masked_sgd_ params": lambda w, s: _sgd([w], [s]),
    "masked_sgd_ momentum_buffers": lambda w, s: _sgd([s], [w]),
    "masked_adam_ params": lambda w, s: _adam([w], [s], [s.clone()]),
    "masked_adam_ exp_avgs": lambda w, s: _adam([s], [w], [s.clone()]),
    "masked_adam_ exp_avg_sqs": lambda w, s: _adam([s], [s.clone()], [w]),
}


@pytest.mark.parametrize("call", sorted(CALLS))
def test_backward_through_a_saved_tensor_the_op_changed_raises(op_device, call):
    """Issue 14: w = x*2; y = (w**2).sum(); op(w); y.backward() gave x.grad[0] = 408 instead of raising."""
    x = torch.tensor([2.0, 3.0], device=op_device, requires_grad=True)
    w = x * 2
    y = (w ** 2).sum()  # saves w
    version = w._version
    CALLS[call](w, torch.zeros(2, device=op_device))
    assert w._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


@pytest.mark.parametrize("call", sorted(CALLS))
def test_versions_bump_under_no_grad_and_leaves_are_refused_under_grad_mode(op_device, call):
    leaf = torch.tensor([2.0, 3.0], device=op_device, requires_grad=True)
    with torch.no_grad():  # how an optimizer step runs
        version = leaf._version
        CALLS[call](leaf, torch.zeros(2, device=op_device))
        assert leaf._version > version
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        CALLS[call](leaf, torch.zeros(2, device=op_device))


def test_raw_ops_bump_versions_and_refuse_a_gradient_through_them(compiled_backend, op_device):
    """The compiled ops, called through the dispatcher without the wrappers, do the same; backpropagating
    through a tensor they wrote raises instead of treating the op as the identity."""
    x = torch.tensor([2.0, 3.0], device=op_device, requires_grad=True)
    w = x * 2
    torch.ops.unlearn_ext.masked_sgd_([w], [torch.ones(2, device=op_device)], [], None, 1.0, 0.5, 0.0, 0.0, 0.0,
                                      False, False, 0.0)
    assert w._version == 1
    with pytest.raises(RuntimeError, match="derivative for unlearn_ext::masked_sgd_ is not implemented"):
        w.sum().backward()
    d = torch.zeros(3, device=op_device)
    torch.ops.unlearn_ext.sparse_accumulate_([d], torch.ones(1, device=op_device), INDEX.to(op_device),
                                             torch.tensor([0, 1], device=op_device), 1.0)
    assert d._version == 1 and d.tolist() == [1.0, 0.0, 0.0]
