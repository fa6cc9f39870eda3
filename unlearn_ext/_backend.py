"""Loads the compiled kernels if they are there (torchao-style graceful loading).

Importing ``unlearn_ext._C`` registers the ``torch.ops.unlearn_ext.*`` ops. If it is missing or fails
to load, the package warns once and every op runs its pure-PyTorch reference instead; ``build_info()``
says which back-end is active. ``UNLEARN_EXT_BACKEND=reference`` forces the reference.
"""
from __future__ import annotations

import os
import warnings

import torch  # noqa: F401  (loads libc10/libtorch, which _C links against, first)

_C = None
_load_error = None
if os.environ.get("UNLEARN_EXT_BACKEND", "") != "reference":
    try:
        from . import _C  # noqa: F811  (registers the ops)
    except (ImportError, OSError) as e:  # missing build, or a build for another torch
        _load_error = f"{type(e).__name__}: {e}"
        warnings.warn(f"unlearn_ext: compiled kernels not loaded ({_load_error}); the ops fall back to the "
                      "pure-PyTorch reference (slow). Rebuild with `pip install --no-build-isolation -e .`.",
                      RuntimeWarning, stacklevel=2)
else:
    _load_error = "disabled by UNLEARN_EXT_BACKEND=reference"

COMPILED = _C is not None
