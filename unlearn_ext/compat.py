"""The NeurIPS 2023 Machine Unlearning challenge contract, ``unlearning(net, retain, forget, validation)
-> net``, as a thin adapter around :func:`unlearn_ext.unlearn`.

The challenge's loaders yield ``(x, y)``; this package's methods want ``(x, y, sample_id)``. A
``DataLoader`` whose samples are pairs is rebuilt over the same dataset, sampler and collate function with
each sample's dataset index as its id — forget samples get ids ``0 … |D_f|−1``, retain samples
``|D_f| … |D_f|+|D_r|−1``, so the two sets never share an id and an id names the same sample in every
epoch. Loaders that already yield ``(x, y, id)`` are used as they are.

``validation`` becomes the method's ``test_loader``: for methods with a forget-accuracy stopping rule
(label flipping, optimization) the adapter's default is ``stop_forget_acc="original_test"`` — stop once
forget accuracy has fallen to the original model's validation accuracy (SPEC §3); pass
``stop_forget_acc=None`` to run every epoch. Methods that need a recorded update store (amnesiac) cannot
run under this contract.
"""
from __future__ import annotations

from torch.utils.data import DataLoader, Dataset

from .methods import get_method, unlearn


class _WithIds(Dataset):
    """``(x, y)`` samples of ``base`` as ``(x, y, first_id + index)``."""

    def __init__(self, base: Dataset, first_id: int):
        self.base, self.first_id = base, int(first_id)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return x, y, self.first_id + i


def with_ids(loader, first_id: int = 0):
    """``loader`` yielding ``(x, y, id)``: unchanged if its samples already carry an id, else rebuilt (same
    batch size, sampler, collate function, workers) over a dataset that appends ``first_id + index``."""
    if loader is None:
        return None
    if not isinstance(loader, DataLoader):
        raise TypeError(f"expected a torch DataLoader, got {type(loader).__name__}")
    if len(loader.dataset[0]) == 3:
        return loader
    return DataLoader(_WithIds(loader.dataset, first_id), batch_sampler=loader.batch_sampler,
                      collate_fn=loader.collate_fn, num_workers=loader.num_workers, pin_memory=loader.pin_memory,
                      timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                      persistent_workers=loader.persistent_workers if loader.num_workers else False)


def unlearning(net, retain, forget, validation, method: str = "partial_optimization", **hparams):
    """Unlearn ``forget`` from ``net`` in place with ``method`` (any registered name; default the paper's
    layer-wise partial gradient ascent) and return ``net``. ``hparams`` go to the method."""
    cls = get_method(method)
    forget_l = with_ids(forget)
    retain_l = with_ids(retain, first_id=len(forget_l.dataset))
    if "test_loader" in cls.defaults:
        hparams.setdefault("test_loader", with_ids(validation))
        hparams.setdefault("stop_forget_acc", "original_test")
    return unlearn(cls(), net, forget=forget_l, retain=retain_l, **hparams).model


__all__ = ["unlearning", "with_ids"]
