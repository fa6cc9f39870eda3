"""Fake (meta) kernels: output shapes depend only on input shapes and the ratio, so torch.compile and
``opcheck`` can trace the ops without running them. They make the wrappers' metadata checks (a call on
meta tensors, or one mixing devices that dispatches here, fails as the kernels would); the values of the
scalar arguments are left to the kernel, which checks them when the compiled graph runs."""
from __future__ import annotations

import torch

from . import checks
from .reference import keep_count


def _shape_ratio(ratio: float) -> float:
    """The ratio the output shapes are computed for: a bad one never reaches a real output (the kernel
    raises), but the shapes must still be computable (keep_count of NaN is not)."""
    return ratio if 0.0 < ratio <= 1.0 else 1.0


@torch.library.register_fake("unlearn_ext::layerwise_topk")
def _layerwise_topk_fake(xs, ratio, largest=True, subtract=None):
    xs, ratio, _ = checks.topk_args("layerwise_topk", xs, ratio, subtract, defer=True)
    total = sum(keep_count(x.numel(), _shape_ratio(ratio)) for x in xs)
    dev = xs[0].device
    return (xs[0].new_empty(total), torch.empty(total, dtype=torch.int32, device=dev),
            torch.empty(len(xs) + 1, dtype=torch.int64, device=dev))


@torch.library.register_fake("unlearn_ext::layerwise_topk_mask")
def _layerwise_topk_mask_fake(xs, ratio, largest=True):
    xs, _, _ = checks.topk_args("layerwise_topk_mask", xs, ratio, None, defer=True)
    return [torch.empty_like(x, dtype=torch.bool) for x in xs]


@torch.library.register_fake("unlearn_ext::sparse_accumulate_")
def _sparse_accumulate_fake(dense, values, indices, offsets, alpha):
    checks.accumulate_args("sparse_accumulate_", dense, values, indices, offsets, alpha, defer=True)


@torch.library.register_fake("unlearn_ext::masked_sgd_")
def _masked_sgd_fake(*args):
    checks.sgd_args("masked_sgd_", *args, defer=True)


@torch.library.register_fake("unlearn_ext::masked_adam_")
def _masked_adam_fake(*args):
    checks.adam_args("masked_adam_", *args, defer=True)
