"""unlearn_ext: fast machine unlearning for PyTorch (layer-wise partial unlearning and its neighbours)."""
from __future__ import annotations

__version__ = "0.1.0"

from . import _backend, ops  # noqa: E402
from .methods import available_methods, register_method, unlearn  # noqa: E402


def build_info() -> dict:
    """Facts about the loaded kernels: version, active back-end ("compiled" or "reference"), whether CUDA
    kernels were compiled, the CUDA arch list, OpenMP use and threads, and the torch version."""
    import torch

    info = {"version": __version__, "backend": "compiled" if _backend.COMPILED else "reference",
            "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available()}
    if _backend.COMPILED:
        info.update(_backend._C.build_info())
    else:
        info.update({"cuda_compiled": False, "cuda_arch_list": "", "openmp": False,
                     "threads": torch.get_num_threads(), "load_error": _backend._load_error})
    return info
