"""The training recipe shared by the original model, Retrain, FT and the amnesiac recording run."""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Iterable, Iterator, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TrainConfig:
    """The paper's protocol: 8 epochs, batch 128, Adam at 1e-3 (5e-4 / 1e-4 for deeper models)."""

    epochs: int = 8
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"  # "adam" | "sgd"
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0
    seed: int = 0  # recorded with a run; train() draws no random numbers itself (the loader seeds its shuffle)

    def to_dict(self) -> dict:
        return asdict(self)


@contextlib.contextmanager
def kernels(deterministic: bool, threads: Optional[int] = None) -> Iterator[None]:
    """Deterministic kernels (when asked; one already on stays on) and ``threads`` torch CPU threads (None: as
    they are) for the block, both restored after: results depend on both."""
    was_deterministic, was_threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(deterministic or was_deterministic)
    torch.set_num_threads(int(threads or was_threads))
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(was_threads)


def unpack_batch(batch) -> Tuple[torch.Tensor, torch.Tensor, object]:
    """``(x, y, sample_id)`` of one batch. Anything else — a dict, an ``(x, y)`` pair, labels that are not
    integers — is a ``ValueError`` saying what is expected, before any tensor is used."""
    if isinstance(batch, (tuple, list)) and len(batch) == 3:
        x, y, ids = batch
        if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
            raise ValueError(f"batches must be (x, y, sample_id) with tensors x and y, got x of type "
                             f"{type(x).__name__} and y of type {type(y).__name__}")
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise ValueError(f"batch labels y must be an integer tensor (class indices), got {y.dtype}")
        return x, y, ids
    if isinstance(batch, Mapping):
        got = f"a dict with keys {sorted(map(str, batch))}"
    elif isinstance(batch, (tuple, list)):
        got = f"a {type(batch).__name__} of {len(batch)} items"
    else:
        got = f"a {type(batch).__name__}"
    raise ValueError(f"loaders must yield (x, y, sample_id) batches, got {got}; "
                     "unlearn_ext.compat.with_ids(loader) adds the sample ids to (x, y) or dict loaders")


def make_optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer must be 'adam' or 'sgd', got {cfg.optimizer!r}")


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, ids,
               recorders: Sequence = ()) -> None:
    """One optimizer step of cross-entropy on ``(x, y)``, wrapped in every recorder's ``step(ids)``: the step of
    :func:`train` and of a replayed run (:mod:`unlearn_ext.deletion.replay`), so that both are bitwise alike."""
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    with contextlib.ExitStack() as stack:
        for rec in recorders:
            stack.enter_context(rec.step(ids))
        opt.step()


def train(model: nn.Module, data, cfg: TrainConfig, recorders: Sequence = (), progress: Optional[str] = None,
          optimizer: Optional[torch.optim.Optimizer] = None) -> nn.Module:
    """Train ``model`` in place on a loader of ``(x, y, sample_id)`` batches for ``cfg.epochs`` epochs.

    Every recorder (:class:`unlearn_ext.record.UpdateRecorder`) wraps each optimizer step with
    ``recorder.step(sample_ids)``, so it sees θ before and after.
    """
    opt = optimizer or make_optimizer(model.parameters(), cfg)
    device = next(model.parameters()).device
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.epochs * len(data), desc=progress, leave=False)
    model.train()
    for _ in range(cfg.epochs):
        for batch in data:
            x, y, ids = unpack_batch(batch)
            train_step(model, opt, x.to(device), y.to(device), ids, recorders)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    model.eval()
    return model
