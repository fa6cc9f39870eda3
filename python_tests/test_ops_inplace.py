"""The in-place ops (sparse_accumulate_, masked_sgd_, masked_adam_) as autograd and memory see them: every
tensor they write gets its version counter bumped like torch's own in-place ops (so a backward that saved
it raises instead of returning a wrong gradient), a leaf that requires grad is refused under grad mode,
and a call whose written tensors share memory (one tensor twice, overlapping views) is refused with a
ValueError naming both positions before anything is written. Each runs on the active back-end (set
UNLEARN_EXT_BACKEND=reference for the reference) and, where a GPU is visible, on CUDA."""
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


# ---- written tensors that share memory --------------------------------------------------------------------

def _dense_cases(dev):
    a, base = torch.zeros(6, device=dev), torch.zeros(10, device=dev)
    return {
        "one tensor twice": ([a, torch.zeros(2, device=dev), a], r"dense\[0\] and dense\[2\]"),
        "overlapping views": ([base[:6], base[4:]], r"dense\[0\] and dense\[1\]"),
        "a view inside another": ([base, base.view(2, 5)[1]], r"dense\[0\] and dense\[1\]"),
    }


@pytest.mark.parametrize("case", sorted(_dense_cases("cpu")))
@pytest.mark.parametrize("raw", (False, True))
def test_dense_that_shares_memory_is_refused(request, op_device, case, raw):
    if raw:
        request.getfixturevalue("compiled_backend")
    dense, match = _dense_cases(op_device)[case]
    L = len(dense)
    values = torch.ones(L, device=op_device)
    indices, offsets = INDEX.repeat(L).to(op_device), torch.arange(L + 1, device=op_device)
    fn = torch.ops.unlearn_ext.sparse_accumulate_ if raw else ops.sparse_accumulate_
    with pytest.raises(ValueError, match=r"sparse_accumulate_: " + match + ".*share memory"):
        fn(dense, values, indices, offsets, 1.0)
    assert all(not bool(d.any()) for d in dense), "nothing may be written"


def test_adjacent_views_of_one_storage_are_accepted(op_device):
    base = torch.zeros(10, device=op_device)
    _accumulate([base[:4], base[4:]])
    assert base.tolist() == [100.0, 0, 0, 0, 100.0, 0, 0, 0, 0, 0]


def _step_cases(dev):
    p, q, base = torch.zeros(4, device=dev), torch.zeros(4, device=dev), torch.zeros(8, device=dev)
    g = [torch.ones(4, device=dev), torch.ones(4, device=dev)]
    return {
        "sgd params twice": (lambda: ops.masked_sgd_([p, p], g, [], None, 1.0, lr=0.5),
                             r"masked_sgd_: params\[0\] and params\[1\]"),
        "sgd param is its buffer": (lambda: ops.masked_sgd_([p, q], g, [q.clone(), p], None, 1.0, lr=0.5,
                                                            momentum=0.9),
                                    r"masked_sgd_: params\[0\] and momentum_buffers\[1\]"),
        "sgd overlapping params": (lambda: ops.masked_sgd_([base[:4], base[2:6]], g, [], None, 1.0, lr=0.5),
                                   r"masked_sgd_: params\[0\] and params\[1\]"),
        "adam moments share": (lambda: ops.masked_adam_([p], g[:1], [base[:4]], [base[3:7]], None, 1.0),
                               r"masked_adam_: exp_avgs\[0\] and exp_avg_sqs\[0\]"),
    }


@pytest.mark.parametrize("case", sorted(_step_cases("cpu")))
def test_step_state_that_shares_memory_is_refused(op_device, case):
    call, match = _step_cases(op_device)[case]
    with pytest.raises(ValueError, match=match + ".*share memory"):
        call()


def test_raw_masked_step_refuses_shared_memory(compiled_backend, op_device):
    p = torch.zeros(4, device=op_device)
    g = [torch.ones(4, device=op_device)] * 2  # read-only tensors may repeat
    with pytest.raises(ValueError, match=r"masked_sgd_: params\[0\] and params\[1\] share memory"):
        torch.ops.unlearn_ext.masked_sgd_([p, p], g, [], None, 1.0, 0.5, 0.0, 0.0, 0.0, False, False, 0.0)
    assert not bool(p.any())
    with pytest.raises(ValueError, match=r"masked_adam_: params\[0\] and exp_avgs\[0\] share memory"):
        torch.ops.unlearn_ext.masked_adam_([p], g[:1], [p], [torch.zeros(4, device=op_device)], None, 1.0, 0.1,
                                           0.9, 0.999, 1e-8, 0.0, 1, False, 0.0)
    assert not bool(p.any())
