"""The compiled kernels must be the loaded back-end (docs/algorithms.md#reference-and-back-ends): the suite
fails when the package silently fell back to the pure-PyTorch reference. Set UNLEARN_EXT_BACKEND=reference to
run the suite against the reference on purpose (then this check skips)."""
import os
import warnings

import pytest
import torch

import unlearn_ext

REFERENCE_ON_PURPOSE = os.environ.get("UNLEARN_EXT_BACKEND", "") == "reference"


def test_compiled_backend_is_loaded():
    info = unlearn_ext.build_info()
    if REFERENCE_ON_PURPOSE:
        assert info["backend"] == "reference"
        pytest.skip("UNLEARN_EXT_BACKEND=reference: running against the reference on purpose")
    assert info["backend"] == "compiled", (
        f"the compiled extension is not loaded ({info.get('load_error')}); rebuild with "
        "`pip install --no-build-isolation --no-deps -e .`")


def test_ops_are_registered():
    if REFERENCE_ON_PURPOSE:
        pytest.skip("UNLEARN_EXT_BACKEND=reference")
    for name in ("layerwise_topk", "layerwise_topk_mask", "sparse_accumulate_", "masked_sgd_", "masked_adam_"):
        op = getattr(torch.ops.unlearn_ext, name)
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.default.name(), "CPU"), name
        if unlearn_ext.build_info()["cuda_compiled"]:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(op.default.name(), "CUDA"), name


def test_build_info_keys():
    info = unlearn_ext.build_info()
    for key in ("version", "backend", "torch", "cuda_compiled", "cuda_arch_list", "openmp", "threads"):
        assert key in info, key
    assert info["version"] == unlearn_ext.__version__
    assert info["backend"] in ("compiled", "reference")
    assert isinstance(info["cuda_compiled"], bool) and isinstance(info["openmp"], bool)
    assert isinstance(info["cuda_arch_list"], str)
    assert isinstance(info["threads"], int) and info["threads"] >= 1
    if info["cuda_compiled"]:
        assert info["cuda_arch_list"], "CUDA kernels compiled but no arch list recorded"
    if info["backend"] == "compiled":
        assert info["openmp"], "built without OpenMP: at::parallel_for would run on one thread"


def test_compiled_kernels_run_on_cpu():
    if REFERENCE_ON_PURPOSE:
        pytest.skip("UNLEARN_EXT_BACKEND=reference")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        values, indices, offsets = torch.ops.unlearn_ext.layerwise_topk([torch.tensor([1.0, -3.0, 2.0])], 0.5,
                                                                        True, None)
    assert indices.tolist() == [1, 2] and values.tolist() == [-3.0, 2.0] and offsets.tolist() == [0, 2]
