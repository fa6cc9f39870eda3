"""Storage and time of an unlearning method (docs/protocol.md#storage-and-time)."""
from __future__ import annotations

from typing import Dict, Optional


def rte(retrain_seconds: float, method_seconds: float) -> float:
    """Run-time efficiency RTE = t_retrain / t_method: how many times faster than retraining (> 1 is faster)."""
    if method_seconds <= 0:
        raise ValueError(f"method_seconds must be > 0, got {method_seconds}")
    return float(retrain_seconds) / float(method_seconds)


def storage(store=None, *, nbytes: Optional[int] = None, dense_nbytes: Optional[int] = None) -> Dict[str, float]:
    """Bytes an amnesiac method keeps, against storing every recorded update densely.

    Give a store (anything with ``nbytes()`` and ``dense_equivalent_nbytes()``, e.g. the record stores) or
    the two numbers. Returns ``bytes``, ``dense_bytes`` and ``fraction_of_dense`` = bytes / dense_bytes.
    """
    if store is not None:
        nbytes, dense_nbytes = store.nbytes(), store.dense_equivalent_nbytes()
    if nbytes is None or dense_nbytes is None:
        raise ValueError("give store= or both nbytes= and dense_nbytes=")
    return {"bytes": int(nbytes), "dense_bytes": int(dense_nbytes),
            "fraction_of_dense": float(nbytes) / dense_nbytes if dense_nbytes else float("nan")}


def efficiency(seconds: float, *, retrain_seconds: Optional[float] = None, store=None,
               nbytes: Optional[int] = None, dense_nbytes: Optional[int] = None) -> Dict[str, float]:
    """One row's efficiency columns: ``seconds``; ``RTE`` when ``retrain_seconds`` is given; ``bytes``,
    ``dense_bytes``, ``fraction_of_dense`` when a store or byte counts are given (see :func:`storage`)."""
    row: Dict[str, float] = {"seconds": float(seconds)}
    if retrain_seconds is not None:
        row["RTE"] = rte(retrain_seconds, seconds)
    if store is not None or nbytes is not None or dense_nbytes is not None:
        row.update(storage(store, nbytes=nbytes, dense_nbytes=dense_nbytes))
    return row
