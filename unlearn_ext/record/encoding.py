"""Compact encoding of sparse parameter updates, one encoding per layer segment
(docs/store-format.md#encoding).

An update arrives as ``(values, indices, offsets)`` — the format of :func:`unlearn_ext.ops.layerwise_topk`:
segment s owns ``values[offsets[s]:offsets[s+1]]`` and their flat int32 indices, ascending, within a
layer of ``numels[s]`` elements. Each segment keeps whichever structure is smallest for its k entries:

=========  ==========================================  =======================================
kind       structure bytes (beside k values)           used when
=========  ==========================================  =======================================
EMPTY      0                                           k == 0 (the layer did not change)
INDEX      4·k (int32 indices)                         4·k <= ⌈n/8⌉, i.e. below about 3% kept
BITMASK    ⌈n/8⌉ (bit i of byte j marks entry 8j+i)    above that
FULL       0 (indices are 0..n-1)                      k == n (a dense layer)
=========  ==========================================  =======================================

Values are stored in segment order whatever the kind, cast to the store's value dtype. Encoding and
decoding are vectorised over all segments (any number of stored updates at once) and run on the device
of their inputs.

With ``drop_zeros=True`` (what the stores use) entries whose value is exactly zero — coordinates the step
did not change — are left out wherever that makes the segment smaller: always for a partial segment, and
for a whole layer unless only a few of its entries are zero (then FULL with those zeros is smaller than a
bitmask). A layer that did not change at all becomes EMPTY.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

Tensor = torch.Tensor

EMPTY, INDEX, BITMASK, FULL = 0, 1, 2, 3
KIND_NAMES = ("empty", "index", "bitmask", "full")


def mask_nbytes(numel: int) -> int:
    return (numel + 7) // 8


def choose_kind(count: int, numel: int) -> int:
    """The smallest encoding of ``count`` kept entries of a layer of ``numel`` elements (ties: INDEX)."""
    if count == 0:
        return EMPTY
    if count == numel:
        return FULL
    return INDEX if 4 * count <= mask_nbytes(numel) else BITMASK


def structure_nbytes(kind: int, count: int, numel: int) -> int:
    """Bytes a segment spends beside its values."""
    return 4 * count if kind == INDEX else mask_nbytes(numel) if kind == BITMASK else 0


@dataclass
class Encoded:
    """Encoded segments (one stored update has L of them; a batch of B updates B·L).

    ``kinds`` uint8 and ``counts`` int64 per segment; ``values`` (value dtype) for every kept entry in
    segment order; ``index`` int32 for the INDEX segments' entries; ``mask`` uint8, the ⌈n/8⌉ bytes of
    every BITMASK segment one after another.
    """

    kinds: Tensor
    counts: Tensor
    values: Tensor
    index: Tensor
    mask: Tensor

    def to(self, device) -> "Encoded":
        return Encoded(*(t.to(device) for t in (self.kinds, self.counts, self.values, self.index, self.mask)))

    @staticmethod
    def cat(parts: Sequence["Encoded"]) -> "Encoded":
        return Encoded(*(torch.cat([getattr(p, f) for p in parts])
                         for f in ("kinds", "counts", "values", "index", "mask")))


def nbytes_by_kind(kinds: Sequence[int], counts: Sequence[int], numels: Sequence[int],
                   value_itemsize: int) -> Dict[str, int]:
    """Exact bytes (values + structure) spent on segments of each kind."""
    out = dict.fromkeys(KIND_NAMES, 0)
    for kind, k, n in zip(kinds, counts, numels):
        out[KIND_NAMES[kind]] += k * value_itemsize + structure_nbytes(kind, k, n)
    return out


def _exclusive_cumsum(x: Tensor) -> Tensor:
    return torch.cumsum(x, 0) - x


def local_positions(counts: Tensor) -> Tensor:
    """0..counts[s]-1 for every segment s, concatenated: the entry's position inside its segment, which
    is its flat index when the segment holds the whole layer."""
    total = int(counts.sum())
    starts = _exclusive_cumsum(counts)
    return torch.arange(total, device=counts.device) - torch.repeat_interleave(starts, counts,
                                                                               output_size=total)


_SHIFTS: Dict[torch.device, Tensor] = {}


def _shifts(device) -> Tensor:
    device = torch.device(device)
    if device not in _SHIFTS:
        _SHIFTS[device] = torch.arange(8, dtype=torch.uint8, device=device)
    return _SHIFTS[device]


def all_finite(t: Tensor) -> bool:
    """No NaN or infinity in ``t`` (one min/max pass: NaN propagates, ±inf is an extreme; several times
    faster than ``isfinite(t).all()`` on the CPU)."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t.reshape(-1))
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def segment_nbytes(count: int, numel: int, value_itemsize: int) -> int:
    """Bytes of a segment of ``count`` entries of a layer of ``numel`` (values + structure)."""
    return count * value_itemsize + structure_nbytes(choose_kind(count, numel), count, numel)


def _pack_bits(flags: Tensor) -> Tensor:
    """A bool vector as bytes, bit i of byte j for entry 8j+i (zero-padded to whole bytes)."""
    if flags.device.type == "cpu":
        return torch.from_numpy(np.packbits(flags.numpy(), bitorder="little"))
    n = flags.numel()
    bits = torch.zeros(8 * mask_nbytes(n), dtype=torch.uint8, device=flags.device)
    bits[:n] = flags
    return torch.sum(bits.view(-1, 8) << _shifts(flags.device), dim=1, dtype=torch.uint8)


def _positions(flags: Tensor) -> Tensor:
    """int64 positions of the True entries of a bool vector (numpy's loop on the CPU: several times
    faster than torch's boolean indexing there)."""
    if flags.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(flags.numpy()))
    return flags.nonzero().view(-1)


def _encode_dense_without_zeros(values: Tensor, offsets: Tensor, seg_numels: Sequence[int],
                                value_dtype: torch.dtype) -> "Encoded":
    """Encode whole layers (``indices=None``), leaving out zero entries where that is smaller."""
    device, itemsize = values.device, value_dtype.itemsize
    off = offsets.tolist()
    kinds, counts, vals, index, masks = [], [], [], [], []
    for s, n in enumerate(seg_numels):
        seg = values[off[s]:off[s + 1]]
        nz = seg != 0
        z = int(np.count_nonzero(nz.numpy())) if nz.device.type == "cpu" else int(nz.sum())
        if z == n or segment_nbytes(n, n, itemsize) < segment_nbytes(z, n, itemsize):
            kinds.append(FULL)
            counts.append(n)
            vals.append(seg)
            continue
        kind = choose_kind(z, n)
        kinds.append(kind)
        counts.append(z)
        if z == 0:
            continue
        pos = _positions(nz)
        vals.append(seg.index_select(0, pos.to(device)))
        if kind == INDEX:
            index.append(pos.to(device=device, dtype=torch.int32))
        else:
            masks.append(_pack_bits(nz).to(device))
    cat = lambda xs, dt: torch.cat(xs) if xs else torch.zeros(0, dtype=dt, device=device)  # noqa: E731
    return Encoded(torch.tensor(kinds, dtype=torch.uint8, device=device),
                   torch.tensor(counts, dtype=torch.int64, device=device),
                   cat(vals, values.dtype).to(value_dtype).contiguous(), cat(index, torch.int32),
                   cat(masks, torch.uint8))


def _drop_zero_entries(values: Tensor, indices: Tensor, offsets: Tensor,
                       seg_numels: Sequence[int], itemsize: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Leave out the zero entries of sparse segments where that makes the segment smaller."""
    nonzero = values != 0
    counts = offsets.diff()
    seg_of = torch.repeat_interleave(torch.arange(len(counts), device=values.device), counts,
                                     output_size=values.numel())
    zs = torch.zeros(len(counts), dtype=torch.int64, device=values.device).index_add_(0, seg_of,
                                                                                       nonzero.to(torch.int64))
    keep_all = [segment_nbytes(c, n, itemsize) < segment_nbytes(z, n, itemsize)
                for c, z, n in zip(counts.tolist(), zs.tolist(), seg_numels)]
    keep = nonzero
    if any(keep_all):
        keep = nonzero | torch.tensor(keep_all, device=values.device)[seg_of]
    kept = torch.zeros(len(keep) + 1, dtype=torch.int64, device=keep.device)
    torch.cumsum(keep, 0, out=kept[1:])
    pos = _positions(keep).to(values.device)
    return values.index_select(0, pos), indices.index_select(0, pos), kept[offsets]


def encode(values: Tensor, indices: Optional[Tensor], offsets: Tensor, numels: Sequence[int],
           value_dtype: torch.dtype = torch.float32, drop_zeros: bool = False) -> Encoded:
    """Encode one or more updates of ``len(numels)`` layers each.

    ``indices=None`` means every entry of every layer is present (a dense update: ``values`` is the
    concatenation of the flattened layers and ``offsets`` their cumulative sizes). ``drop_zeros``: leave
    out exact zeros where that is smaller (module docstring).
    """
    if drop_zeros and int(torch.count_nonzero(values)) != values.numel():
        n_segs = offsets.numel() - 1
        if n_segs % len(numels):
            raise ValueError(f"offsets has {n_segs} segments, not a multiple of {len(numels)} layers")
        seg_numels = list(numels) * (n_segs // len(numels))
        if indices is None:
            return _encode_dense_without_zeros(values, offsets, seg_numels, value_dtype)
        values, indices, offsets = _drop_zero_entries(values, indices, offsets, seg_numels, value_dtype.itemsize)
    device = values.device
    off = offsets.tolist()
    counts = [b - a for a, b in zip(off[:-1], off[1:])]
    if len(counts) % len(numels):
        raise ValueError(f"offsets has {len(counts)} segments, not a multiple of {len(numels)} layers")
    seg_numels = list(numels) * (len(counts) // len(numels))
    kinds = [choose_kind(k, n) for k, n in zip(counts, seg_numels)]
    counts_t = torch.tensor(counts, dtype=torch.int64, device=device)
    kinds_t = torch.tensor(kinds, dtype=torch.uint8, device=device)
    vals = values.to(value_dtype).contiguous()
    if indices is None or all(k in (EMPTY, FULL) for k in kinds):
        return Encoded(kinds_t, counts_t, vals, torch.zeros(0, dtype=torch.int32, device=device),
                       torch.zeros(0, dtype=torch.uint8, device=device))
    if device.type == "cpu":
        index, mask = _structure_by_segment(indices, off, kinds, seg_numels)
    else:
        index, mask = _structure_vectorised(indices, counts_t, kinds_t, kinds, seg_numels)
    return Encoded(kinds_t, counts_t, vals, index.contiguous(), mask)


def _structure_by_segment(indices: Tensor, off: Sequence[int], kinds: Sequence[int],
                          seg_numels: Sequence[int]) -> Tuple[Tensor, Tensor]:
    """The INDEX segments' indices and the BITMASK segments' masks, a few ops per segment (on the CPU:
    a scatter of True into the bool flags of every bitmask segment, then one packbits, is several times
    faster than :func:`_structure_vectorised`'s per-entry bit arithmetic)."""
    bits = [8 * mask_nbytes(n) if k == BITMASK else 0 for k, n in zip(kinds, seg_numels)]
    # numpy's zeros: torch.zeros of this size costs several times more on two threads (first-touch faults)
    flags = torch.from_numpy(np.zeros(sum(bits), dtype=bool))
    positions = indices.long() if BITMASK in kinds else indices
    true = torch.ones((), dtype=torch.bool)
    index_parts, start = [], 0
    for s, kind in enumerate(kinds):
        if kind == INDEX:
            index_parts.append(indices[off[s]:off[s + 1]])
        elif kind == BITMASK:
            seg = positions[off[s]:off[s + 1]]
            flags[start:start + bits[s]].scatter_(0, seg, true.expand(seg.numel()))
            start += bits[s]
    index = torch.cat(index_parts) if index_parts else torch.zeros(0, dtype=torch.int32)
    return index, _pack_bits(flags)


def _structure_vectorised(indices: Tensor, counts_t: Tensor, kinds_t: Tensor, kinds: Sequence[int],
                          seg_numels: Sequence[int]) -> Tuple[Tensor, Tensor]:
    """:func:`_structure_by_segment` in a fixed number of tensor ops whatever the number of segments
    (for GPUs, where a loop over segments would cost a launch each)."""
    device = indices.device
    sparse = {k for k in kinds if k in (INDEX, BITMASK)}
    mixed = len(sparse) > 1 or FULL in kinds
    entry_kind = torch.repeat_interleave(kinds_t, counts_t, output_size=len(indices)) if mixed else None
    index = torch.zeros(0, dtype=torch.int32, device=device)
    if INDEX in sparse:
        index = indices[entry_kind == INDEX] if mixed else indices
    mask = torch.zeros(0, dtype=torch.uint8, device=device)
    if BITMASK in sparse:
        seg_bytes = torch.tensor([mask_nbytes(n) if k == BITMASK else 0 for k, n in zip(kinds, seg_numels)],
                                 dtype=torch.int64, device=device)
        bit_base = 8 * torch.repeat_interleave(_exclusive_cumsum(seg_bytes), counts_t, output_size=len(indices))
        pos = indices.long() + bit_base
        if mixed:
            pos = pos[entry_kind == BITMASK]
        # Bit p of the masks is bit p % 8 of byte p // 8; the bits of one byte are distinct powers of two,
        # so adding them sets them (O(kept entries), no n-sized temporary).
        mask = torch.zeros(int(seg_bytes.sum()), dtype=torch.uint8, device=device)
        mask.index_add_(0, pos >> 3, torch.bitwise_left_shift(torch.ones((), dtype=torch.uint8, device=device),
                                                              (pos & 7).to(torch.uint8)))
    return index, mask


def decode(enc: Encoded, numels: Sequence[int]) -> Tuple[Tensor, Tensor, Tensor]:
    """``(values, int32 indices, int64 offsets)`` of the encoded segments (layers cycle through
    ``numels``), on ``enc``'s device — the input format of :func:`unlearn_ext.ops.sparse_accumulate_`."""
    device = enc.values.device
    counts, kinds = enc.counts, enc.kinds
    total = int(counts.sum())
    if total != enc.values.numel():
        raise ValueError(f"encoded update is inconsistent: counts sum to {total} but there are "
                         f"{enc.values.numel()} values")
    offsets = torch.zeros(len(counts) + 1, dtype=torch.int64, device=device)
    torch.cumsum(counts, 0, out=offsets[1:])
    present = set(torch.unique(kinds[counts > 0]).tolist())
    indices = torch.empty(total, dtype=torch.int32, device=device)
    if present == {INDEX}:
        indices.copy_(enc.index)
    elif present == {BITMASK}:  # what partial recording above ~3% kept stores: no per-entry kinds needed
        indices.copy_(_decode_bits(enc, numels))
    elif present:
        entry_kind = torch.repeat_interleave(kinds, counts, output_size=total)
        parts: List[Tuple[int, Tensor]] = []
        if INDEX in present:
            parts.append((INDEX, enc.index))
        if FULL in present:
            parts.append((FULL, local_positions(torch.where(kinds == FULL, counts, 0))))
        if BITMASK in present:
            parts.append((BITMASK, _decode_bits(enc, numels)))
        for kind, local in parts:
            sel = entry_kind == kind
            if int(sel.sum()) != local.numel():
                raise ValueError(f"encoded update is inconsistent: {KIND_NAMES[kind]} segments hold "
                                 f"{local.numel()} entries, counts say {int(sel.sum())}")
            indices[sel] = local.to(torch.int32)
    return enc.values, indices, offsets


def _decode_bits(enc: Encoded, numels: Sequence[int]) -> Tensor:
    """Local indices of the BITMASK segments' entries, in segment order (checked against ``counts``)."""
    device = enc.mask.device
    reps = len(enc.counts) // len(numels)
    seg_numels = torch.tensor(list(numels), dtype=torch.int64, device=device).repeat(reps)
    is_bits = enc.kinds == BITMASK
    seg_bits = torch.where(is_bits, 8 * ((seg_numels + 7) // 8), 0)
    bit_ends = torch.cumsum(seg_bits, 0)
    if len(bit_ends) == 0 or int(bit_ends[-1]) != 8 * enc.mask.numel():
        raise ValueError(f"encoded update is inconsistent: {enc.mask.numel()} mask bytes do not match "
                         "the bitmask layers' sizes")
    if device.type == "cpu":
        flags = torch.from_numpy(np.unpackbits(enc.mask.numpy(), bitorder="little"))
    else:
        flags = ((enc.mask.unsqueeze(1) >> _shifts(device)) & 1).view(-1)
    pos = flags.nonzero().view(-1)
    # Entries per segment, and per segment those inside the layer (bits past its end pad the last
    # byte and must be clear), by searching the segments' bounds among the sorted positions: a few
    # searches per segment rather than one per entry.
    bit_starts = bit_ends - seg_bits
    start, layer_end, end = torch.searchsorted(
        pos, torch.stack([bit_starts, bit_starts + torch.where(is_bits, seg_numels, 0), bit_ends]))
    per_seg = end - start
    if not torch.equal(per_seg, torch.where(is_bits, enc.counts, 0)) or not torch.equal(layer_end, end):
        raise ValueError("encoded update is inconsistent: the bitmasks do not match the entry counts")
    return pos - torch.repeat_interleave(bit_starts, per_seg, output_size=pos.numel())
