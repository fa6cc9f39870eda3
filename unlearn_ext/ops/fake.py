"""Fake (meta) kernels: output shapes depend only on input shapes and the ratio, so torch.compile and
``opcheck`` can trace the ops without running them."""
from __future__ import annotations

import torch

from .reference import keep_count


@torch.library.register_fake("unlearn_ext::layerwise_topk")
def _layerwise_topk_fake(xs, ratio, largest=True, subtract=None):
    total = sum(keep_count(x.numel(), ratio) for x in xs)
    dev = xs[0].device
    return (xs[0].new_empty(total), torch.empty(total, dtype=torch.int32, device=dev),
            torch.empty(len(xs) + 1, dtype=torch.int64, device=dev))


@torch.library.register_fake("unlearn_ext::layerwise_topk_mask")
def _layerwise_topk_mask_fake(xs, ratio, largest=True):
    return [torch.empty_like(x, dtype=torch.bool) for x in xs]


@torch.library.register_fake("unlearn_ext::sparse_accumulate_")
def _sparse_accumulate_fake(dense, values, indices, offsets, alpha):
    return None


@torch.library.register_fake("unlearn_ext::masked_sgd_")
def _masked_sgd_fake(params, grads, momentum_buffers, masks, ratio, lr, momentum, dampening, weight_decay,
                     nesterov, maximize, off_scale):
    return None


@torch.library.register_fake("unlearn_ext::masked_adam_")
def _masked_adam_fake(params, grads, exp_avgs, exp_avg_sqs, masks, ratio, lr, beta1, beta2, eps,
                      weight_decay, step, maximize, off_scale):
    return None
