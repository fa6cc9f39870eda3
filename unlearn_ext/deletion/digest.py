"""Digests that name a model state and a recording: what a request log chains and binds to."""
from __future__ import annotations

import hashlib
from typing import Mapping

import torch

from ..record.identity import dtype_name


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (hex) of a ``state_dict``: every entry's name, dtype, shape and bytes, in name order — two states
    have the same digest iff they are bitwise the same. Every value must be a tensor (``ValueError`` naming the
    first that is not)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"state entry {name!r} is a {type(t).__name__}, not a tensor")
        t = t.detach().cpu().contiguous()
        h.update(f"{name}\0{dtype_name(t.dtype)}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def recording_digest(store) -> str:
    """SHA-256 (hex) of what a store recorded, without its payload: the manifest's fingerprint, keep ratio and
    value dtype, and each record's step and sample ids. The per-rank stores of one sharded run share it; a
    store that lost or gained a record since does not."""
    m = store.manifest
    h = hashlib.sha256(f"{m.fingerprint}:{m.keep_ratio}:{m.value_dtype}".encode())
    for step in store.steps():
        ids = store.sample_ids(step)
        h.update(f"\n{step}:{ids.numel()}:".encode())
        h.update(ids.to(torch.int64).numpy().tobytes())
    return h.hexdigest()


__all__ = ["recording_digest", "state_digest"]
