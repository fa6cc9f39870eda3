"""The NeurIPS 2023 Machine Unlearning challenge contract, ``unlearning(net, retain, forget, validation)
-> net``, as a thin adapter around :func:`unlearn_ext.unlearn`.

The challenge's loaders yield ``(x, y)`` (its CIFAR-10 starting kit) or dicts with ``"image"`` and
``"age_group"`` (its face data); this package's methods want ``(x, y, sample_id)``. A ``DataLoader`` whose
samples are pairs or such dicts is rebuilt over the same dataset and sampler (and, for pairs, collate
function) with each sample's dataset index as its id — forget samples get ids ``0 … |D_f|−1``, retain samples
``|D_f| … |D_f|+|D_r|−1``, so the two sets never share an id and an id names the same sample in every
epoch. Loaders that already yield ``(x, y, id)`` are used as they are.

``validation`` becomes the method's ``test_loader``: for methods with a forget-accuracy stopping rule
(label flipping, optimization) the adapter's default is ``stop_forget_acc="original_test"`` — stop once
forget accuracy has fallen to the original model's validation accuracy (the paper's rule) — a model already
there (common for a random forget set, whose accuracy is near the validation accuracy) is returned
unchanged; pass ``stop_forget_acc=None`` to run every epoch, ``stop_every_step=True`` to check the rule
before every step instead of every epoch. Methods that need a recorded update store (amnesiac) run only
when ``store=`` is passed and the loaders already yield the sample ids the store was recorded with.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Optional, Tuple

from torch.utils.data import DataLoader, Dataset, default_collate

from .methods import get_method, unlearn

#: Keys of a dict sample, in order of preference: the input, the label.
INPUT_KEYS = ("image", "input", "inputs", "x")
LABEL_KEYS = ("age_group", "label", "labels", "target", "targets", "y")


def _dict_keys(sample: Mapping) -> Tuple[str, str]:
    found = [next((k for k in keys if k in sample), None) for keys in (INPUT_KEYS, LABEL_KEYS)]
    if None in found:
        raise ValueError(f"a dict sample needs an input key {INPUT_KEYS} and a label key {LABEL_KEYS}; "
                         f"got keys {sorted(sample)}")
    return found[0], found[1]


class _WithIds(Dataset):
    """``(x, y)`` samples (or dicts, read through ``keys``) of ``base`` as ``(x, y, first_id + index)``."""

    def __init__(self, base: Dataset, first_id: int, keys: Optional[Tuple[str, str]] = None):
        self.base, self.first_id, self.keys = base, int(first_id), keys

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        sample = self.base[i]
        if self.keys is not None:
            return sample[self.keys[0]], sample[self.keys[1]], self.first_id + i
        x, y = sample
        return x, y, self.first_id + i


def with_ids(loader, first_id: int = 0):
    """``loader`` yielding ``(x, y, id)``: unchanged if its samples already are ``(x, y, id)`` triples,
    else rebuilt (same batch sampler, workers; same collate function for pairs, torch's default for
    dicts) over a dataset that appends ``first_id + index``."""
    if loader is None:
        return None
    if not isinstance(loader, DataLoader):
        raise TypeError(f"expected a torch DataLoader, got {type(loader).__name__}")
    if loader.batch_sampler is None:
        raise ValueError("loaders with automatic batching disabled (batch_size=None) are not supported")
    first = loader.dataset[0]
    keys = None
    if isinstance(first, Mapping):
        keys = _dict_keys(first)
    elif len(first) == 3:
        return loader
    elif len(first) != 2:
        raise ValueError(f"samples must be (x, y), (x, y, id) or dicts; got a sequence of {len(first)}")
    return DataLoader(_WithIds(loader.dataset, first_id, keys), batch_sampler=loader.batch_sampler,
                      collate_fn=default_collate if keys else loader.collate_fn,
                      num_workers=loader.num_workers, pin_memory=loader.pin_memory,
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


__all__ = ["unlearning", "with_ids", "INPUT_KEYS", "LABEL_KEYS"]
