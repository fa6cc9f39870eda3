"""The algorithm API: one class per method, a registry, and ``unlearn()`` (docs/algorithms.md#the-method-api).

Data are loaders yielding ``(x, y, sample_id)``; a DataLoader stands for the samples it yields, its sampler
included (:func:`.common.loader_positions`). A method changes the model **in place** and returns it inside an
:class:`UnlearnResult` with the wall-clock seconds and method-specific statistics (steps run, bytes read from
a store, ...), in the train/eval mode it came in (methods set the modes they run in themselves). Copy the
model first (``copy.deepcopy``) to keep the original.

Forget ids that are also retain ids are named before anything runs: a ``UserWarning`` — two loaders may
number their samples independently (an ``IndexedTensorDataset`` numbers its own 0..n−1), which most methods
never compare — or a ``ValueError`` for a method that tells D_f from D_r by id in batches that mix them
(:attr:`Method.mixes_by_id`: the retain samples with a forget id would be treated as forget samples). For a
warning the ids are compared only when both loaders' datasets keep them (:func:`.common.stored_per_sample`):
reading them otherwise costs a pass over D_r, which every call would pay; a ``mixes_by_id`` method pays it,
being about to pass over D_r several times anyway.
"""
from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar, Dict, Optional, Type, Union

import torch
from torch import nn

from . import hparams
from .common import sample_ids, stored_per_sample


@dataclass
class UnlearnResult:
    model: nn.Module
    seconds: float
    stats: dict = field(default_factory=dict)


_DEFAULT = object()


class Method:
    """Subclasses set ``name`` and ``defaults`` (every hyper-parameter, with the documented default) and
    implement ``_run(model, forget, retain, store, hp) -> stats``. ``ranges`` bounds numeric
    hyper-parameters beyond what :mod:`.hparams` checks for every method (the type of each default;
    integers ``>= 0``). A method that reads updates recorded during training sets ``needs_store`` and, if
    it wants them pruned, ``record_keep_ratio``; callers get the matching recorder from :meth:`recorder`.

    What the experiment runner (:mod:`unlearn_ext.protocol`) gives a method beyond its defaults is declared
    here: ``uses_model_lr``, ``takes_run_keep_ratio``, ``budget_in_forget_passes`` (each needs the
    hyper-parameter it acts on; :func:`register_method` checks). A method whose defaults hold ``epochs`` and
    :data:`.common.STOP_HPARAMS` can stop at a forget accuracy, so the runner calibrates it to the forgetting
    target."""

    name: ClassVar[str] = ""
    defaults: ClassVar[Dict[str, object]] = {}
    ranges: ClassVar[Dict[str, hparams.Range]] = {}
    needs_retain: ClassVar[bool] = False
    needs_store: ClassVar[bool] = False
    #: Keep ratio of the recording a store-reading method expects (None: dense updates).
    record_keep_ratio: ClassVar[Optional[float]] = None
    #: The method tells forget from retain samples by sample id in batches that mix them: a forget id that
    #: is also a retain id is refused (else warned about).
    mixes_by_id: ClassVar[bool] = False

    #: Its ``lr`` is by definition the model's training learning rate: the experiment runner passes that rate
    #: (a method that does not declare it keeps its own default rate).
    uses_model_lr: ClassVar[bool] = False
    #: Its ``keep_ratio`` is the run's keep ratio r: the runner passes r (a row per r of a sweep) and refuses a
    #: keep_ratio given for this method alone.
    takes_run_keep_ratio: ClassVar[bool] = False
    #: Its ``epochs`` are passes over D_f: when calibrated, its step budget is counted in optimizer steps
    #: (:data:`unlearn_ext.protocol.STEP_BUDGET`) instead of its own epochs.
    budget_in_forget_passes: ClassVar[bool] = False

    @classmethod
    def recorder(cls, model: nn.Module, keep_ratio=_DEFAULT, store=None, **kw):
        """The :class:`~unlearn_ext.record.UpdateRecorder` to wrap the training run with (pass it to
        :func:`unlearn_ext.train.train` as ``recorders=[...]``): pruned at ``keep_ratio`` (default
        :attr:`record_keep_ratio`; None = dense). ``store`` defaults to a new MemoryStore; ``kw`` goes to
        the recorder (``value_dtype``, ``only_ids``)."""
        from ..record import UpdateRecorder

        ratio = cls.record_keep_ratio if keep_ratio is _DEFAULT else keep_ratio
        return UpdateRecorder(model, keep_ratio=ratio, store=store, **kw)

    def __init__(self, **hparams):
        self.hparams = self._merge(dict(self.defaults), hparams)

    def _merge(self, base: dict, extra: dict) -> dict:
        unknown = sorted(set(extra) - set(self.defaults))
        if unknown:
            raise ValueError(f"{self.name}: unknown hyper-parameter(s) {unknown}; "
                             f"known: {sorted(self.defaults)}")
        base.update(extra)
        return base

    @classmethod
    def unsupported(cls, model: nn.Module) -> Optional[str]:
        """Why this method cannot run on ``model`` (e.g. it acts on conv layers and there are none), or None."""
        return None

    def unlearn(self, model: nn.Module, forget, retain=None, store=None, **extra) -> UnlearnResult:
        hp = hparams.check_all(self.name, self._merge(dict(self.hparams), extra), self.defaults, self.ranges)
        reason = self.unsupported(model)
        if reason:
            raise ValueError(f"{self.name}: {reason}")
        if forget is None:
            raise ValueError(f"{self.name}: forget must be a loader of (x, y, sample_id) batches")
        if _is_empty(self.name, "forget", forget):
            raise ValueError(f"{self.name}: the forget set is empty: nothing to unlearn")
        if self.needs_retain and (retain is None or _is_empty(self.name, "retain", retain)):
            raise ValueError(f"{self.name}: needs retain= (a non-empty loader of the retain set)")
        if self.needs_store and store is None:
            raise ValueError(f"{self.name}: needs store= (the update store recorded during training)")
        if retain is not None:
            self._check_disjoint(forget, retain)
        modes = [(m, m.training) for m in model.modules()]  # per module: a frozen BatchNorm stays in eval
        start = time.perf_counter()
        try:
            stats = self._run(model, forget, retain, store, hp) or {}
        finally:
            for m, training in modes:
                m.training = training
        seconds = time.perf_counter() - start
        return UnlearnResult(model, seconds, {"method": self.name, "hparams": _plain(hp), **stats})

    def _check_disjoint(self, forget, retain) -> None:
        """Name forget ids that are also retain ids (module docstring: refused or warned about)."""
        if self.mixes_by_id:
            forget_ids, retain_ids = sample_ids(self.name, "forget", forget), sample_ids(self.name, "retain", retain)
        else:
            forget_ids, retain_ids = stored_per_sample(forget, "ids"), stored_per_sample(retain, "ids")
            if forget_ids is None or retain_ids is None:
                return
        shared = torch.unique(forget_ids[torch.isin(forget_ids, retain_ids.to(forget_ids.device))])
        if not shared.numel():
            return
        what = (f"{self.name}: {shared.numel()} forget sample id(s) are also retain sample ids, e.g. "
                f"{shared[:5].tolist()}")
        if self.mixes_by_id:
            raise ValueError(f"{what}: this method tells forget from retain samples by id, so those retain "
                             "samples would be unlearned too; give the two sets distinct ids")
        warnings.warn(f"{what}: if they are the same samples, the retain set still holds what is to be "
                      "forgotten; if the two loaders number their samples independently, give them distinct "
                      "ids", UserWarning, stacklevel=3)

    def _run(self, model, forget, retain, store, hp: dict) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError


_END = object()


def _is_empty(method: str, role: str, loader) -> bool:
    """True for a loader that yields no sample: read off its length (a DataLoader's: its sampler's batches,
    not its dataset's size), else by drawing its first batch. A one-shot iterator (a generator) is refused —
    every method passes over its data more than once or needs it again for statistics, and a spent iterator
    would silently give it nothing."""
    if isinstance(loader, Iterator):
        if next(loader, _END) is _END:
            return True
        raise ValueError(f"{method}: {role} is a one-shot iterator ({type(loader).__name__}); pass a "
                         "DataLoader or a list of (x, y, sample_id) batches, which can be iterated again")
    try:
        return len(loader) == 0
    except TypeError:  # e.g. a DataLoader over an IterableDataset
        return next(iter(loader), _END) is _END


def _plain(hp: dict) -> dict:
    """Hyper-parameters as JSON-friendly values (callables and objects by name)."""
    return {k: (v if isinstance(v, (int, float, str, bool, type(None), list, tuple)) else repr(v))
            for k, v in hp.items()}


_REGISTRY: Dict[str, Type[Method]] = {}

#: The hyper-parameters each runner declaration of :class:`Method` acts on.
_DECLARATION_HPARAMS = {"uses_model_lr": ("lr",), "takes_run_keep_ratio": ("keep_ratio",),
                        "budget_in_forget_passes": ("epochs",)}


def register_method(cls: Type[Method]) -> Type[Method]:
    """Class decorator: make ``cls`` available as ``unlearn(cls.name, ...)``. A runner declaration whose
    hyper-parameters are not among ``cls.defaults`` is refused (the runner would silently not honour it)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty `name`")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"a method named {cls.name!r} is already registered ({_REGISTRY[cls.name].__name__})")
    for declaration, needed in _DECLARATION_HPARAMS.items():
        missing = [k for k in needed if k not in cls.defaults]
        if getattr(cls, declaration) and missing:
            raise ValueError(f"{cls.__name__} declares {declaration} but its defaults lack {missing}")
    _REGISTRY[cls.name] = cls
    return cls


def unregister_method(name: str) -> None:
    """Remove method ``name`` from the registry (e.g. a method a test registered for itself)."""
    get_method(name)  # an unknown name raises, listing the known ones
    del _REGISTRY[name]


def get_method(name: str) -> Type[Method]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {available_methods()}") from None


def available_methods() -> list:
    return sorted(_REGISTRY)


def unlearn(method: Union[str, Method, Type[Method]], model: nn.Module, forget, retain=None, store=None,
            **hp) -> UnlearnResult:
    """Run ``method`` (a registered name, a Method class or instance) on ``model`` in place."""
    if isinstance(method, str):
        method = get_method(method)()
    elif isinstance(method, type):
        method = method()
    return method.unlearn(model, forget, retain=retain, store=store, **hp)
