"""The ops inside torch.compile(fullgraph=True) (issue 14): a second call with another ratio (dynamo then
traces the ratio as a symbolic float) compiles and matches eager, and a bad ratio or hyper-parameter
inside compiled code raises the op's ValueError (the compiled kernel checks it when the graph runs)
instead of dynamo's "Unsupported: Observed exception". Backend aot_eager: dynamo, the fake kernels and
AOTAutograd's functionalisation of the in-place ops, without inductor's code generation time."""
import pytest
import torch

from unlearn_ext import ops

pytestmark = pytest.mark.usefixtures("compiled_backend")  # the reference reads data while tracing


def _compile(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


def test_topk_with_changing_and_bad_ratios(seed):
    xs = [torch.randn(100), torch.randn(30, 3), torch.randn(1)]
    topk = _compile(lambda xs, r: ops.layerwise_topk(xs, r))
    mask = _compile(lambda xs, r: ops.layerwise_topk_mask(xs, r))
    for r in (0.3, 0.05):
        for got, want in zip(topk(xs, r), ops.layerwise_topk(xs, r)):
            assert torch.equal(got, want)
        assert all(torch.equal(g, w) for g, w in zip(mask(xs, r), ops.layerwise_topk_mask(xs, r)))
    for bad in (1.5, float("nan")):
        with pytest.raises(ValueError, match=r"layerwise_topk: ratio must be in \(0, 1\]"):
            topk(xs, bad)
        with pytest.raises(ValueError, match=r"layerwise_topk_mask: ratio must be in \(0, 1\]"):
            mask(xs, bad)


def test_masked_sgd_with_changing_and_bad_scalars(seed):
    def step(params, grads, lr, r):
        ops.masked_sgd_(params, grads, None, None, r, lr=lr)

    compiled = _compile(step)
    grads = [torch.randn(50), torch.randn(7, 3)]
    for lr, r in ((0.1, 0.5), (0.2, 0.5), (0.3, 0.2)):
        got, want = [torch.ones(50), torch.ones(7, 3)], [torch.ones(50), torch.ones(7, 3)]
        compiled(got, grads, lr, r)
        step(want, grads, lr, r)
        assert all(torch.equal(g, w) for g, w in zip(got, want))
    params = [torch.ones(50), torch.ones(7, 3)]
    for lr, r, match in ((-1.0, 0.5, "lr must be finite and >= 0.0"), (0.1, 2.0, r"ratio must be in \(0, 1\]")):
        with pytest.raises(ValueError, match="masked_sgd_: " + match):
            compiled(params, grads, lr, r)
        assert all(bool((p == 1).all()) for p in params), "nothing may be written"


def test_sparse_accumulate_with_a_bad_alpha():
    def apply(dense, alpha):
        ops.sparse_accumulate_(dense, torch.ones(2), torch.tensor([0, 1], dtype=torch.int32),
                               torch.tensor([0, 2]), alpha)

    compiled = _compile(apply)
    dense = [torch.zeros(4)]
    compiled(dense, 1.0)
    compiled(dense, 2.0)
    assert dense[0].tolist() == [3.0, 3.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="sparse_accumulate_: alpha must be finite"):
        compiled(dense, float("inf"))
    assert dense[0].tolist() == [3.0, 3.0, 0.0, 0.0]
