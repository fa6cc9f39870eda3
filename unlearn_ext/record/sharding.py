"""Which block of each parameter this process holds when the model is sharded — FSDP2's ``fully_shard``,
or any model whose parameters are DTensors — and where a store recorded on a shard applies.

After ``fully_shard(model)`` every parameter is a DTensor: rank r holds one block of it (``p.to_local()``,
by default rows ``offset .. offset + n`` of dim 0, split as ``torch.chunk`` splits). No rank ever holds a
whole update, so each rank records the update of its own blocks into its own store. The manifest of
such a store carries a :class:`ShardLayout`: the mesh (shape, dimension names, this rank's coordinate)
and, per layer, the global shape, the block's offset and the placements; the manifest's shapes are the
local blocks' shapes, its fingerprint is the whole model's (so the same for every rank and for the
unsharded model).

Placements: ``Shard(dim)`` and ``Replicate`` on any number of mesh dimensions (FSDP2 on a 1-D mesh,
HSDP on a 2-D one). Ranks that hold the same blocks — the replicas along a mesh dimension on which
every parameter is replicated — record the same updates, so only the replica at coordinate 0 records
(as rank 0 does under DDP). ``Partial`` and strided shards (FSDP2 combined with tensor parallelism)
raise ``ValueError``: their local block is not a plain block of the parameter.

Applying: on a sharded model a store applies to the local blocks — only if they are the blocks it
recorded (same offsets and shapes), else ``ValueError`` naming the layer. On an unsharded model each
rank's store applies to its block of the whole parameter, so applying every rank's store (one replica
each) removes the whole update.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

Tensor = torch.Tensor
Shape = Tuple[int, ...]
REPLICATE = "replicate"


def _dtensor_module():
    """``torch.distributed.tensor`` if it was imported (no DTensor can exist otherwise), else None."""
    return sys.modules.get("torch.distributed.tensor")


def is_sharded(t: Tensor) -> bool:
    mod = _dtensor_module()
    return mod is not None and isinstance(t, mod.DTensor)


def local_tensor(p: Tensor) -> Tensor:
    """The block of ``p`` this process holds (``p`` itself unless it is a DTensor), detached. Asked
    anew each time: FSDP2 replaces a parameter's local tensor at its lazy initialisation."""
    return p.to_local().detach() if is_sharded(p) else p.detach()


@dataclass(frozen=True)
class LayerBlock:
    """Where a layer's local block lies in the whole parameter: ``offset[d] .. offset[d] + local
    shape[d]`` in every dimension d; ``placements`` per mesh dimension (``"shard(d)"`` or ``"replicate"``)."""

    global_shape: Shape
    offset: Shape
    placements: Tuple[str, ...]

    def to_dict(self) -> dict:
        return {"global_shape": list(self.global_shape), "offset": list(self.offset),
                "placements": list(self.placements)}

    def view_of(self, whole: Tensor, local_shape: Shape) -> Tensor:
        """This block of the whole parameter ``whole`` (a view, not contiguous unless sharded on dim 0)."""
        return whole[tuple(slice(o, o + n) for o, n in zip(self.offset, local_shape))]


@dataclass(frozen=True)
class ShardLayout:
    """The mesh of a sharded recording and the block of every recorded layer on this rank."""

    rank: int
    world_size: int
    mesh_shape: Shape
    mesh_dim_names: Optional[Tuple[str, ...]]
    coordinate: Shape
    blocks: Tuple[LayerBlock, ...]

    @property
    def replicated_dims(self) -> List[int]:
        return [d for d in range(len(self.mesh_shape)) if self.blocks[0].placements[d] == REPLICATE]

    def records(self) -> bool:
        """Whether this rank records: it is the first replica of its blocks."""
        return all(self.coordinate[d] == 0 for d in self.replicated_dims)

    def to_dict(self) -> dict:
        return {"rank": self.rank, "world_size": self.world_size,
                "mesh": {"shape": list(self.mesh_shape), "coordinate": list(self.coordinate),
                         "dim_names": None if self.mesh_dim_names is None else list(self.mesh_dim_names)},
                "layers": [b.to_dict() for b in self.blocks]}

    @classmethod
    def from_dict(cls, d, local_shapes: Sequence[Shape], bad: Callable[[str, str], ValueError]) -> "ShardLayout":
        """The layout written by :meth:`to_dict`, every field checked against the manifest's
        ``local_shapes``: ``bad(field, why)`` is raised otherwise."""
        if not isinstance(d, dict) or set(d) != {"rank", "world_size", "mesh", "layers"}:
            raise bad("shards", "must be an object with rank, world_size, mesh and layers")
        world = _int(d["world_size"], "shards.world_size", bad, low=1)
        rank = _int(d["rank"], "shards.rank", bad, high=world - 1)
        mesh = d["mesh"]
        if not isinstance(mesh, dict) or set(mesh) != {"shape", "coordinate", "dim_names"}:
            raise bad("shards.mesh", "must be an object with shape, coordinate and dim_names")
        mesh_shape = _ints(mesh["shape"], "shards.mesh.shape", bad, low=1)
        if not mesh_shape:
            raise bad("shards.mesh.shape", "must not be empty")
        coordinate = _ints(mesh["coordinate"], "shards.mesh.coordinate", bad)
        if len(coordinate) != len(mesh_shape) or any(c >= s for c, s in zip(coordinate, mesh_shape)):
            raise bad("shards.mesh.coordinate", f"{list(coordinate)} is not a position in a mesh of shape "
                                                f"{list(mesh_shape)}")
        names = mesh["dim_names"]
        if names is not None and (not isinstance(names, list) or len(names) != len(mesh_shape)
                                  or not all(isinstance(n, str) for n in names)):
            raise bad("shards.mesh.dim_names", f"must be null or {len(mesh_shape)} strings")
        layers = d["layers"]
        if not isinstance(layers, list) or len(layers) != len(local_shapes):
            raise bad("shards.layers", f"must list the blocks of the manifest's {len(local_shapes)} layers")
        blocks = tuple(_block(b, f"shards.layers[{i}]", local, len(mesh_shape), bad)
                       for i, (b, local) in enumerate(zip(layers, local_shapes)))
        mismatch = _replication_mismatch(blocks, lambda i: f"layer {i}")
        if mismatch:
            raise bad("shards.layers", mismatch)
        return cls(rank, world, mesh_shape, None if names is None else tuple(names), coordinate, blocks)


def _int(x, field: str, bad, low: int = 0, high: Optional[int] = None) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < low or (high is not None and x > high):
        raise bad(field, f"must be an integer in [{low}, {'∞' if high is None else high}], got {x!r}")
    return x


def _ints(xs, field: str, bad, low: int = 0) -> Shape:
    if not isinstance(xs, list):
        raise bad(field, f"must be a list of integers, got {xs!r}")
    return tuple(_int(x, field, bad, low) for x in xs)


def _block(b, field: str, local: Shape, mesh_dims: int, bad) -> LayerBlock:
    if not isinstance(b, dict) or set(b) != {"global_shape", "offset", "placements"}:
        raise bad(field, "must be an object with global_shape, offset and placements")
    whole = _ints(b["global_shape"], f"{field}.global_shape", bad)
    offset = _ints(b["offset"], f"{field}.offset", bad)
    if len(whole) != len(local) or len(offset) != len(local) or \
            any(o + n > g for o, n, g in zip(offset, local, whole)):
        raise bad(field, f"block at offset {list(offset)} of shape {list(local)} does not fit in the global "
                         f"shape {list(whole)}")
    placements = b["placements"]
    valid = [REPLICATE] + [f"shard({d})" for d in range(len(whole))]
    if not isinstance(placements, list) or len(placements) != mesh_dims or any(p not in valid for p in placements):
        raise bad(f"{field}.placements", f"must be {mesh_dims} of {valid}, got {placements!r}")
    return LayerBlock(whole, offset, tuple(placements))


def _replication_mismatch(blocks: Sequence[LayerBlock], layer_name: Callable[[int], str]) -> Optional[str]:
    """Why the layers cannot be recorded together, if they are not all replicated on the same mesh
    dimensions (the first replica records every layer, so the replicas must be the same for all)."""
    first = [p == REPLICATE for p in blocks[0].placements]
    for i, b in enumerate(blocks):
        if [p == REPLICATE for p in b.placements] != first:
            return (f"{layer_name(i)} is replicated on mesh dimensions "
                    f"{[d for d, p in enumerate(b.placements) if p == REPLICATE]}, {layer_name(0)} on "
                    f"{[d for d, r in enumerate(first) if r]}: a recording needs the same replicated dimensions "
                    "for every parameter")
    return None


def block_of(name: str, p: Tensor) -> Tuple[LayerBlock, Shape]:
    """``(block, local shape)`` of the DTensor parameter ``p`` on this rank; ``ValueError`` naming it for
    a placement that is not a plain block (Partial, strided shards) or a local tensor of another shape."""
    mod = _dtensor_module()
    coordinate = p.device_mesh.get_coordinate()
    if coordinate is None:
        raise ValueError(f"parameter {name!r}: this rank is not in its device mesh")
    size, offset, placements = list(p.shape), [0] * p.dim(), []
    for d, pl in enumerate(p.placements):
        if type(pl) is mod.Replicate:
            placements.append(REPLICATE)
            continue
        if type(pl) is not mod.Shard:
            raise ValueError(f"parameter {name!r} has the placement {pl} on mesh dimension {d}: only Shard(dim) "
                             "and Replicate (FSDP2, HSDP) give each rank a block of the parameter to record")
        dim = pl.dim % p.dim()
        chunk = -(-size[dim] // p.device_mesh.size(d))  # torch.chunk's split
        start = min(coordinate[d] * chunk, size[dim])
        offset[dim] += start
        size[dim] = max(0, min(chunk, size[dim] - start))
        placements.append(f"shard({dim})")
    local = tuple(p.to_local().shape)
    if tuple(size) != local:
        raise ValueError(f"parameter {name!r}: its local tensor has shape {local}, but its placements "
                         f"{tuple(p.placements)} give a block of shape {tuple(size)}; this layout cannot be recorded")
    return LayerBlock(tuple(p.shape), tuple(offset), tuple(placements)), local


def layout_of(named: Sequence[Tuple[str, Tensor]]) -> Tuple[Optional[ShardLayout], List[Shape]]:
    """``(layout, shapes)`` of the layers ``named``: ``(None, their shapes)`` for ordinary tensors, the
    :class:`ShardLayout` and the local blocks' shapes for DTensors. ``ValueError`` if only some are
    DTensors, or they live on different meshes."""
    sharded = [is_sharded(p) for _, p in named]
    if not any(sharded):
        return None, [tuple(p.shape) for _, p in named]
    if not all(sharded):
        plain = named[sharded.index(False)][0]
        raise ValueError(f"parameter {plain!r} is an ordinary tensor but {named[sharded.index(True)][0]!r} is a "
                         "DTensor shard: shard every recorded parameter (with FSDP2, call fully_shard on the root "
                         "module too) so that each rank records the block of every layer it holds")
    mesh = named[0][1].device_mesh
    for name, p in named:
        if p.device_mesh != mesh:
            raise ValueError(f"parameter {name!r} is on the device mesh {p.device_mesh}, {named[0][0]!r} on {mesh}: "
                             "a recording needs one mesh")
    pairs = [block_of(name, p) for name, p in named]
    blocks = tuple(b for b, _ in pairs)
    mismatch = _replication_mismatch(blocks, lambda i: f"parameter {named[i][0]!r}")
    if mismatch:
        raise ValueError(mismatch)
    layout = ShardLayout(dist.get_rank(), dist.get_world_size(), tuple(mesh.shape),
                         None if mesh.mesh_dim_names is None else tuple(mesh.mesh_dim_names),
                         tuple(mesh.get_coordinate()), blocks)
    return layout, [local for _, local in pairs]


def target(name: str, p: Tensor, layout: Optional[ShardLayout], index: int, local_shape: Shape) -> Tensor:
    """The tensor a store's layer ``index`` applies to in the model's parameter ``p`` (module docstring):
    the parameter, its local block, or the recorded block of the whole parameter."""
    if layout is None:
        if is_sharded(p):
            raise ValueError(f"parameter {name!r} is a DTensor shard but the store holds whole layers: apply it to "
                             "the unsharded model (gather the parameters first)")
        return p.detach()
    block = layout.blocks[index]
    if is_sharded(p):
        mine, local = block_of(name, p)
        if (mine, local) != (block, tuple(local_shape)):
            raise ValueError(f"parameter {name!r}: this rank holds the block at offset {mine.offset} of shape {local} "
                             f"({', '.join(mine.placements)}), but the store recorded the block at offset "
                             f"{block.offset} of shape {tuple(local_shape)} ({', '.join(block.placements)}): open the "
                             "store this rank recorded, or apply every rank's store to the unsharded model")
        return local_tensor(p)
    return block.view_of(p.detach(), local_shape)


__all__ = ["LayerBlock", "ShardLayout", "block_of", "is_sharded", "layout_of", "local_tensor", "target"]
