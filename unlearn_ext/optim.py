"""Layer-wise partial optimizers: drop-in ``torch.optim.SGD`` / ``torch.optim.AdamW`` that update only
``keep_count(nˡ, keep_ratio)`` coordinates of every parameter tensor per step
(docs/algorithms.md#masked_sgd_-and-masked_adam_).

Each step makes one fused :func:`unlearn_ext.ops.masked_sgd_` / :func:`~unlearn_ext.ops.masked_adam_`
call per parameter group (two only in the corner cases noted below), so the arithmetic never loops over
layers in Python.

Selection (``selection=``), per parameter tensor ("layer") and step:

* ``"magnitude"`` (default): the kˡ entries of largest |grad| — the *M-max* partial update of adaptive
  filtering; chosen inside the op (``masks=None``), ties by lower flat index.
* ``"random"``: a fresh uniformly random kˡ-subset every step. One ``torch.rand`` draw over the whole
  group from a generator re-seeded from ``(seed, group index, step)``, then the op's top-k of those
  scores — so a run is reproducible and a ``state_dict`` round trip continues the same sequence.
* ``"round_robin"``: the flat coordinates split into fixed contiguous blocks ``[j·kˡ, (j+1)·kˡ)`` (the
  last one shorter when kˡ does not divide nˡ), block ``(t − 1) mod ⌈nˡ/kˡ⌉`` at the tensor's t-th step —
  the *sequential* partial update.
* ``"fixed"`` (set by passing ``masks=``): the same bool mask for a tensor at every step, e.g. a saliency
  mask (SalUn, SFR-on) or MSG's re-initialised entries; ``keep_ratio`` is then unused. The masks live in
  the parameter group (``group["masks"]``, aligned with ``group["params"]``), so they travel with
  ``state_dict`` and may be replaced between steps.

Unselected coordinates get ``off_scale · grad`` (default 0: param and optimizer state bitwise unchanged;
weight decay and momentum do not move them). ``keep_ratio=1.0`` (default) is the plain optimizer and
matches ``torch.optim.SGD`` / ``AdamW`` from the first step.

State uses torch's names — ``momentum_buffer`` (SGD), ``step`` / ``exp_avg`` / ``exp_avg_sq`` (AdamW) —
so ``state_dict`` / ``load_state_dict`` are torch's own and a torch optimizer's state loads here. SGD
keeps a per-tensor ``step`` as well when the selection needs a step count (random, round robin).

Semantics worth knowing:

* torch.optim.SGD's first momentum step sets ``buf = d``; here the buffer is created zeroed and that first
  step runs with ``dampening=0`` (``0·momentum + d == d``). With ``dampening != 0``, a group whose tensors
  are at different steps (one had no grad earlier) therefore takes two op calls. With ``keep_ratio < 1``
  a coordinate first selected at a later step starts from the zero buffer, i.e. gets ``(1 − dampening)·d``.
* AdamW's bias correction uses each tensor's step count; tensors of one group at different counts are
  stepped in one op call per distinct count.
* Non-contiguous parameters (``channels_last`` conv weights, strided views) are stepped through a
  contiguous copy written back afterwards; optimizer state is always contiguous.
* Not supported (``ValueError``): sparse or complex gradients, AdamW's ``amsgrad``, ``differentiable`` and
  ``capturable``. ``foreach`` / ``fused`` are accepted for drop-in compatibility and ignored (the step is
  always one fused op call).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch

from . import ops

Tensor = torch.Tensor
SELECTIONS = ("magnitude", "random", "round_robin", "fixed")


def _contiguous_state(state: dict, key: str) -> Tensor:
    """``state[key]``, made contiguous in place if it is not (state loaded from a torch optimizer that
    kept a channels_last parameter's layout), since the ops write it in place."""
    if not state[key].is_contiguous():
        state[key] = state[key].contiguous()
    return state[key]


class _PartialOptimizer(torch.optim.Optimizer):
    """What PartialSGD and PartialAdamW share: partial-update options, gradient gathering, masks."""

    def __init__(self, params, defaults: dict, *, keep_ratio: float, selection: str, off_scale: float,
                 seed: int, differentiable: bool, masks: Optional[Sequence[Tensor]] = None):
        if differentiable:
            raise ValueError(f"{type(self).__name__} does not support differentiable=True")
        ops.checks.ratio("keep_ratio", keep_ratio)
        ops.checks.finite("off_scale", off_scale, low=0.0)
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        if masks is not None:
            if selection not in ("magnitude", "fixed"):
                raise ValueError(f"masks= fixes the selection; it cannot be combined with selection={selection!r}")
            selection = "fixed"
        defaults.update(keep_ratio=float(keep_ratio), selection=selection, off_scale=float(off_scale),
                        seed=int(seed), masks=None)
        super().__init__(params, defaults)
        self._generators: Dict[torch.device, torch.Generator] = {}
        if masks is not None:
            self._distribute_masks(list(masks))
        for group in self.param_groups:
            if group["masks"] is not None:  # masks given per group ({"params": ..., "masks": ...})
                group["selection"] = "fixed"
            if group["selection"] == "fixed":
                self._check_masks(group)

    def _distribute_masks(self, masks: List[Tensor]) -> None:
        """``masks`` (one per parameter, groups in order) into each group's ``"masks"``."""
        total = sum(len(g["params"]) for g in self.param_groups)
        if len(masks) != total:
            raise ValueError(f"masks must hold one mask per parameter ({total}), got {len(masks)}")
        start = 0
        for group in self.param_groups:
            n = len(group["params"])
            group["masks"], group["selection"] = masks[start:start + n], "fixed"
            start += n

    @staticmethod
    def _check_masks(group: dict) -> None:
        masks = group["masks"]
        if masks is None or len(masks) != len(group["params"]):
            raise ValueError('selection="fixed" needs masks: one bool tensor per parameter of the group')
        for i, (m, p) in enumerate(zip(masks, group["params"])):
            if not isinstance(m, Tensor) or m.dtype != torch.bool or m.shape != p.shape or m.device != p.device:
                got = (tuple(m.shape), m.dtype, str(m.device)) if isinstance(m, Tensor) else type(m).__name__
                raise ValueError(f"masks[{i}] must be a bool tensor of the parameter's shape {tuple(p.shape)} "
                                 f"on {p.device}, got {got}")

    def __setstate__(self, state):
        # load_state_dict goes through here: groups saved by torch.optim.SGD/AdamW lack our options.
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            params, grads = self._gather(group)
            if params:
                self._write_back(params, self._step_group(gi, group, params, grads))
        return loss

    def _step_group(self, gi: int, group: dict, params: List[Tensor], grads: List[Tensor]) -> List[Tensor]:
        """Step one group's tensors that have a gradient; returns the tensors the op wrote (``params`` or
        contiguous copies of them, for :meth:`_write_back`)."""
        raise NotImplementedError

    def _gather(self, group: dict):
        """(params, grads) of the group's tensors that have a gradient, as torch's optimizers skip the rest."""
        params, grads = [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise ValueError(f"{type(self).__name__} does not support sparse gradients")
            if torch.is_complex(p):
                raise ValueError(f"{type(self).__name__} does not support complex parameters")
            params.append(p)
            grads.append(p.grad)
        return params, grads

    @staticmethod
    def _contiguous(params: List[Tensor]) -> List[Tensor]:
        """The tensors the op writes: each param itself, or a contiguous copy of a non-contiguous one
        (channels_last conv weights, strided views) — see :meth:`_write_back`."""
        return [p if p.is_contiguous() else p.contiguous() for p in params]

    @staticmethod
    def _write_back(params: List[Tensor], work: List[Tensor]) -> None:
        for p, w in zip(params, work):
            if w is not p:
                p.copy_(w)  # keeps p's own memory format

    def _masks(self, group: dict, group_index: int, params: List[Tensor], steps: List[int]
               ) -> Optional[List[Tensor]]:
        """Explicit masks for the random / round-robin / fixed selections; None lets the op pick by |grad|."""
        ratio, selection = group["keep_ratio"], group["selection"]
        if selection == "fixed":
            self._check_masks(group)  # they may have been replaced since the last step
            position = {id(p): i for i, p in enumerate(group["params"])}
            return [group["masks"][position[id(p)]].contiguous() for p in params]
        if selection == "magnitude" or ratio == 1.0:
            return None
        if selection == "random":
            dev = params[0].device
            gen = self._generators.get(dev)
            if gen is None:
                gen = self._generators[dev] = torch.Generator(device=dev)
            # Re-seeded from the step count (kept in state), so a reloaded optimizer draws the same subsets.
            gen.manual_seed((group["seed"] * 1_000_003 + group_index * 7_919 + steps[0]) % (2**63 - 1))
            sizes = [p.numel() for p in params]
            scores = torch.rand(sum(sizes), generator=gen, device=dev).split(sizes)
            return ops.layerwise_topk_mask([s.view(p.shape) for s, p in zip(scores, params)], ratio)
        masks = []
        for p, t in zip(params, steps):  # round robin: builds masks only, no arithmetic per layer
            n = p.numel()
            k = ops.keep_count(n, ratio)
            block = (t - 1) % math.ceil(n / k)
            m = torch.zeros(n, dtype=torch.bool, device=p.device)
            m[block * k:(block + 1) * k] = True
            masks.append(m.view(p.shape))
        return masks


class PartialSGD(_PartialOptimizer):
    """``torch.optim.SGD`` with layer-wise partial updates through :func:`unlearn_ext.ops.masked_sgd_`.

    Same constructor as ``torch.optim.SGD`` plus ``keep_ratio`` (r ∈ (0, 1], default 1.0 = plain SGD),
    ``selection`` ("magnitude" | "random" | "round_robin"), ``off_scale`` (default 0) and ``seed`` (for
    ``selection="random"``), all four settable per parameter group; or ``masks`` — one bool tensor per
    parameter, fixed for every step (``selection="fixed"``): ``PartialSGD(params, lr=..., masks=m,
    off_scale=0.1)`` is MSG's damped update.
    """

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: Optional[bool] = None, differentiable: bool = False, fused: Optional[bool] = None,
                 keep_ratio: float = 1.0, selection: str = "magnitude", off_scale: float = 0.0, seed: int = 0,
                 masks: Optional[Sequence[Tensor]] = None):
        for name, v in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
            ops.checks.finite(name, v, low=0.0)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=float(lr), momentum=float(momentum), dampening=float(dampening),
                        weight_decay=float(weight_decay), nesterov=bool(nesterov), maximize=bool(maximize),
                        foreach=foreach, fused=fused, differentiable=False)
        super().__init__(params, defaults, keep_ratio=keep_ratio, selection=selection, off_scale=off_scale,
                         seed=seed, differentiable=differentiable, masks=masks)

    def _step_group(self, gi: int, group: dict, params: List[Tensor], grads: List[Tensor]) -> List[Tensor]:
        momentum = group["momentum"]
        counted = group["selection"] in ("random", "round_robin")  # they need a step count
        steps, bufs, fresh = [], [], []
        for p in params:
            state = self.state[p]
            if counted:
                state["step"] = state.get("step", torch.tensor(0.0)) + 1
                steps.append(int(state["step"].item()))
            if momentum != 0:
                fresh.append("momentum_buffer" not in state)
                if fresh[-1]:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                bufs.append(_contiguous_state(state, "momentum_buffer"))
        masks = self._masks(group, gi, params, steps)
        hyper = dict(ratio=group["keep_ratio"], lr=group["lr"], momentum=momentum,
                     weight_decay=group["weight_decay"], nesterov=group["nesterov"],
                     maximize=group["maximize"], off_scale=group["off_scale"])
        work = self._contiguous(params)
        if momentum == 0 or group["dampening"] == 0 or all(fresh) or not any(fresh):
            # A zeroed buffer with dampening 0 is torch's first step (buf = d).
            damp = 0.0 if (momentum != 0 and all(fresh)) else group["dampening"]
            ops.masked_sgd_(work, grads, bufs, masks, dampening=damp, **hyper)
        else:  # new and old buffers with dampening != 0: one call each
            for new in (True, False):
                idx = [i for i, f in enumerate(fresh) if f == new]
                ops.masked_sgd_([work[i] for i in idx], [grads[i] for i in idx], [bufs[i] for i in idx],
                                None if masks is None else [masks[i] for i in idx],
                                dampening=0.0 if new else group["dampening"], **hyper)
        return work


class PartialAdamW(_PartialOptimizer):
    """``torch.optim.AdamW`` with layer-wise partial updates through :func:`unlearn_ext.ops.masked_adam_`.

    Same constructor as ``torch.optim.AdamW`` (``amsgrad`` must stay False) plus ``keep_ratio``,
    ``selection``, ``off_scale``, ``seed`` and ``masks`` as in :class:`PartialSGD`. Weight decay is
    decoupled and, with ``off_scale=0``, applied only to the selected coordinates.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: Optional[bool] = None, capturable: bool = False, differentiable: bool = False,
                 fused: Optional[bool] = None, keep_ratio: float = 1.0, selection: str = "magnitude",
                 off_scale: float = 0.0, seed: int = 0, masks: Optional[Sequence[Tensor]] = None):
        if amsgrad or capturable:
            raise ValueError("PartialAdamW supports neither amsgrad nor capturable")
        for name, v in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
            ops.checks.finite(name, v, low=0.0)
        for i, b in enumerate(betas):
            if not 0.0 <= float(b) < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {b}")
        defaults = dict(lr=float(lr), betas=(float(betas[0]), float(betas[1])), eps=float(eps),
                        weight_decay=float(weight_decay), amsgrad=False, maximize=bool(maximize),
                        foreach=foreach, capturable=False, differentiable=False, fused=fused)
        super().__init__(params, defaults, keep_ratio=keep_ratio, selection=selection, off_scale=off_scale,
                         seed=seed, differentiable=differentiable, masks=masks)

    def _step_group(self, gi: int, group: dict, params: List[Tensor], grads: List[Tensor]) -> List[Tensor]:
        steps = []
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            _contiguous_state(state, "exp_avg")
            _contiguous_state(state, "exp_avg_sq")
            state["step"] += 1
            steps.append(int(state["step"].item()))
        masks = self._masks(group, gi, params, steps)
        beta1, beta2 = group["betas"]
        work = self._contiguous(params)
        for t in sorted(set(steps)):  # bias correction is per step count: one call per distinct count
            idx = [i for i, s in enumerate(steps) if s == t]
            sub = [params[i] for i in idx]
            ops.masked_adam_([work[i] for i in idx], [grads[i] for i in idx],
                             [self.state[p]["exp_avg"] for p in sub], [self.state[p]["exp_avg_sq"] for p in sub],
                             None if masks is None else [masks[i] for i in idx], ratio=group["keep_ratio"],
                             lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                             weight_decay=group["weight_decay"], step=t, maximize=group["maximize"],
                             off_scale=group["off_scale"])
        return work


__all__ = ["PartialSGD", "PartialAdamW", "SELECTIONS"]
