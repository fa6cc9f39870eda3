"""The records of an update store as dense tensors, for tests that compare what was recorded."""
from __future__ import annotations

from typing import Iterable, List, Optional

import torch

from unlearn_ext import ops


def dense_updates(store, steps: Optional[Iterable[int]] = None) -> List[List[torch.Tensor]]:
    """Each record of ``steps`` (default: all) as one float32 tensor per recorded layer, of the manifest's
    shapes (a sharded recording's local blocks)."""
    out = []
    for rec in store.records(steps):
        dense = [torch.zeros(s) for s in store.manifest.shapes]
        ops.sparse_accumulate_(dense, rec.values.float(), rec.indices, rec.offsets, 1.0)
        out.append(dense)
    return out
