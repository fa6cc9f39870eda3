"""Which model a store's records belong to: :class:`Manifest` (the recorded layers and settings) and
:func:`model_fingerprint` (docs/store-format.md#manifest-and-fingerprint).

A store refuses a model whose fingerprint differs from its manifest's, naming the first layer that
differs; a manifest read from a file is checked field by field, since every record is interpreted
through it. A manifest made from a model (:meth:`Manifest.from_model`, by the recorder and the storage
planner) refuses what could never be applied: a recorded parameter that is not float32, float16 or
bfloat16, or one of more than 2**31 − 1 elements — before anything is recorded or written.

Layers are named as in the plain model whatever wraps it (:func:`named_parameters`): DDP's and
DataParallel's ``module.`` and torch.compile's ``_orig_mod.`` (of a compiled model or a compiled
submodule) are left out, so a store recorded on a compiled or DDP-wrapped model applies to the plain
one and back. A sharded model (FSDP2) has its whole parameters' shapes in the fingerprint and its
local blocks' shapes in the manifest, which then carries the :class:`~.sharding.ShardLayout`.
"""
from __future__ import annotations

import functools
import hashlib
import json
import re
import sys
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..ops import checks
from .sharding import ShardLayout, layout_of

VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FINGERPRINT = re.compile(r"[0-9a-f]{16}")
_COMPILED = re.compile(r"(^|\.)_orig_mod\.")  # the path component torch.compile's wrapper adds


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


#: The value dtypes by the names the command line, configurations and manifests use ("float32", ...).
VALUE_DTYPE_BY_NAME = {dtype_name(d): d for d in VALUE_DTYPES}


def _is_compiled(model: nn.Module) -> bool:
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # imported by any torch.compile call
    return eval_frame is not None and isinstance(model, eval_frame.OptimizedModule)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel (their parameter names carry ``module.``)
    and torch.compile's wrapper (``_orig_mod.``), however they are nested."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif _is_compiled(model):
            model = model._orig_mod
        else:
            return model


def named_parameters(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    """``model.named_parameters()`` named as in the plain model: unwrapped (:func:`unwrap_model`) and
    without the ``_orig_mod.`` of submodules compiled in place of the originals."""
    return [(_COMPILED.sub(r"\1", n), p) for n, p in unwrap_model(model).named_parameters()]


def model_fingerprint(model: nn.Module) -> str:
    """sha256 (first 16 hex digits) of every parameter's name, shape and dtype, in named_parameters order
    (names and whole shapes as in the plain, unsharded model).

    Frozen parameters count too, so freezing a layer after training does not change the fingerprint."""
    h = hashlib.sha256()
    for name, shape, dtype in model_layers(model):
        h.update(f"{name}:{shape}:{dtype}\n".encode())
    return h.hexdigest()[:16]


def model_layers(model: nn.Module) -> List[Tuple[str, Tuple[int, ...], str]]:
    """``(name, shape, dtype)`` of every parameter of ``model`` (what its fingerprint hashes)."""
    return [(n, tuple(p.shape), dtype_name(p.dtype)) for n, p in named_parameters(model)]


@dataclass(frozen=True)
class Manifest:
    """What a store's records mean: the recorded (trainable) layers in named_parameters order.

    ``shapes`` are the recorded tensors' shapes: the local blocks when ``shards`` is set (a sharded
    recording, :mod:`.sharding`), whose ``blocks`` then give the whole parameters' shapes."""

    names: Tuple[str, ...]
    shapes: Tuple[Tuple[int, ...], ...]
    dtypes: Tuple[str, ...]
    keep_ratio: Optional[float]
    value_dtype: str
    fingerprint: str
    shards: Optional[ShardLayout] = None

    @classmethod
    def from_model(cls, model: nn.Module, keep_ratio: Optional[float] = None,
                   value_dtype: torch.dtype = torch.float32) -> "Manifest":
        """The manifest of recording ``model``'s trainable parameters. ``ValueError`` for a recording that
        could never be used: a parameter in a dtype the ops cannot apply updates to (float32, float16 and
        bfloat16 are supported) or of more than 2**31 − 1 elements (in the recorded block, if sharded)."""
        if value_dtype not in VALUE_DTYPES:
            raise ValueError(f"value_dtype must be one of {', '.join(map(str, VALUE_DTYPES))}, got {value_dtype}")
        named = trainable_parameters(model)
        if not named:
            raise ValueError("the model has no trainable parameters to record")
        for name, p in named:
            if p.dtype not in checks.FLOAT_DTYPES:
                raise ValueError(f"parameter {name!r} has dtype {p.dtype}: its updates could never be applied; "
                                 f"recorded parameters must be {', '.join(map(str, checks.FLOAT_DTYPES))} (convert "
                                 "the model, e.g. model.float(), or freeze the parameter)")
        shards, shapes = layout_of(named)
        for name, shape in zip((n for n, _ in named), shapes):
            if _numel(shape) > checks.MAX_NUMEL:
                raise ValueError(f"parameter {name!r} has {_numel(shape)} elements; {_TOO_MANY}")
        return cls(tuple(n for n, _ in named), tuple(shapes), tuple(dtype_name(p.dtype) for _, p in named),
                   None if keep_ratio is None else float(keep_ratio), dtype_name(value_dtype),
                   model_fingerprint(model), shards)

    @property
    def global_shapes(self) -> Tuple[Tuple[int, ...], ...]:
        """The whole parameters' shapes (``shapes`` unless the recording is sharded)."""
        return self.shapes if self.shards is None else tuple(b.global_shape for b in self.shards.blocks)

    @functools.cached_property
    def numels(self) -> List[int]:
        """Elements of each recorded tensor (computed once: every record read is checked against them)."""
        return [_numel(shape) for shape in self.shapes]

    @property
    def torch_value_dtype(self) -> torch.dtype:
        return getattr(torch, self.value_dtype)

    def dense_nbytes(self) -> int:
        """Bytes of one dense update in the layers' own dtypes (what naive recording would keep)."""
        return sum(n * getattr(torch, d).itemsize for n, d in zip(self.numels, self.dtypes))

    def to_json(self) -> bytes:
        layers = [{"name": n, "shape": list(s), "dtype": d} for n, s, d in zip(self.names, self.shapes, self.dtypes)]
        d = {"layers": layers, "keep_ratio": self.keep_ratio, "value_dtype": self.value_dtype,
             "fingerprint": self.fingerprint}
        if self.shards is not None:  # absent, not null, for an unsharded recording: its bytes stay as before
            d["shards"] = self.shards.to_dict()
        return json.dumps(d, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes, source: str = "manifest") -> "Manifest":
        """The manifest written by :meth:`to_json`. Every field is checked: ``ValueError`` naming
        ``source`` (the file) and the field otherwise."""
        def bad(field: str, why: str) -> ValueError:
            return ValueError(f"{source}: the manifest's field {field!r} {why}")

        try:
            d = json.loads(bytes(raw).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{source}: the manifest is not UTF-8 JSON ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{source}: the manifest is not a JSON object (got {type(d).__name__})")
        fields = {"layers", "keep_ratio", "value_dtype", "fingerprint"}
        missing, unknown = sorted(fields - d.keys()), sorted(d.keys() - fields - {"shards"})
        if missing:
            raise bad(missing[0], "is missing")
        if unknown:
            raise bad(unknown[0], "is not a manifest field")
        layers = d["layers"]
        if not isinstance(layers, list) or not layers:
            raise bad("layers", f"must be a non-empty list, got {_short(layers)}")
        names, shapes, dtypes = [], [], []
        for i, layer in enumerate(layers):
            if not isinstance(layer, dict) or set(layer) != {"name", "shape", "dtype"}:
                raise bad(f"layers[{i}]", f"must be an object with name, shape and dtype, got {_short(layer)}")
            names.append(_layer_name(layer, i, bad, names))
            shapes.append(_layer_shape(layer, i, bad))
            dtypes.append(_layer_dtype(layer, i, bad))
        keep_ratio = d["keep_ratio"]
        if keep_ratio is not None:
            try:
                keep_ratio = checks.ratio("keep_ratio", keep_ratio)
            except ValueError:
                raise bad("keep_ratio", f"must be null or a number in (0, 1], got {_short(keep_ratio)}") from None
        value_dtype = d["value_dtype"]
        if value_dtype not in VALUE_DTYPE_BY_NAME:
            raise bad("value_dtype", f"must be one of {', '.join(VALUE_DTYPE_BY_NAME)}, got "
                                     f"{_short(value_dtype)}")
        fingerprint = d["fingerprint"]
        if not isinstance(fingerprint, str) or not _FINGERPRINT.fullmatch(fingerprint):
            raise bad("fingerprint", f"must be 16 lower-case hex digits, got {_short(fingerprint)}")
        shards = ShardLayout.from_dict(d["shards"], shapes, bad) if "shards" in d else None
        return cls(tuple(names), tuple(shapes), tuple(dtypes), keep_ratio, value_dtype, fingerprint, shards)


_TOO_MANY = "at most 2**31 - 1 are supported (indices are int32)"


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _layer_name(layer: dict, i: int, bad, seen: Sequence[str]) -> str:
    name = layer["name"]
    if not isinstance(name, str) or not name:
        raise bad(f"layers[{i}].name", f"must be a non-empty string, got {_short(name)}")
    if name in seen:
        raise bad(f"layers[{i}].name", f"repeats the layer name {name!r}")
    return name


def _layer_shape(layer: dict, i: int, bad) -> Tuple[int, ...]:
    shape = layer["shape"]
    if not isinstance(shape, list) or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in shape):
        raise bad(f"layers[{i}].shape", f"must be a list of non-negative integers, got {_short(shape)}")
    if _numel(shape) > checks.MAX_NUMEL:
        raise bad(f"layers[{i}].shape", f"has {_numel(shape)} elements; {_TOO_MANY}")
    return tuple(shape)


def _layer_dtype(layer: dict, i: int, bad) -> str:
    name = layer["dtype"]
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype) or not (dtype.is_floating_point or dtype.is_complex):
        raise bad(f"layers[{i}].dtype", f"must name a floating-point torch dtype, got {_short(name)}")
    return name


def describe_difference(m: Manifest, layers: Sequence[Tuple[str, Tuple[int, ...], str]]) -> str:
    """``" (first difference: ...)"`` between a manifest's layers and another model's ``(name, shape,
    dtype)`` list (all its parameters, or a manifest's trainable ones)."""
    theirs = {n: (tuple(s), d) for n, s, d in layers}
    for name, shape, dtype in zip(m.names, m.global_shapes, m.dtypes):
        if name not in theirs:
            return f" (first difference: the store's layer {name!r} is not a parameter of this model)"
        if theirs[name] != (tuple(shape), dtype):
            s, d = theirs[name]
            return f" (first difference: layer {name!r} is {tuple(shape)} {dtype} in the store, {s} {d} in this model)"
    extra = [n for n, _, _ in layers if n not in set(m.names)]
    if extra:
        return f" (first difference: this model has the parameter {extra[0]!r}, which the store does not record)"
    return " (a frozen parameter differs)"


def trainable_parameters(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    """The parameters a recorder records: those with ``requires_grad``, named as :func:`named_parameters`."""
    return [(n, p) for n, p in named_parameters(model) if p.requires_grad]


__all__ = ["Manifest", "VALUE_DTYPES", "VALUE_DTYPE_BY_NAME", "describe_difference", "dtype_name", "model_fingerprint",
           "model_layers", "named_parameters", "trainable_parameters", "unwrap_model"]
