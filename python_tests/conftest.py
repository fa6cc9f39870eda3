"""Shared fixtures: a fresh random seed per test (printed, so a failing test shows how to replay it with
``UNLEARN_EXT_TEST_SEED=<seed>``), random layer lists that exercise the kernels' edge cases, and a small
trained LeNet with its partial recording for the methods' refusal tests."""
from __future__ import annotations

import os
import random

import pytest
import torch

import unlearn_ext  # noqa: F401  (registers torch.ops.unlearn_ext.* before any test uses them)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture
def seed() -> int:
    s = int(os.environ.get("UNLEARN_EXT_TEST_SEED", "0")) or int.from_bytes(os.urandom(4), "little")
    print(f"seed = {s}  (replay: UNLEARN_EXT_TEST_SEED={s})")
    torch.manual_seed(s)
    random.seed(s)
    return s


def _layer(shape, dtype, kind: str, gen: torch.Generator) -> torch.Tensor:
    if kind == "ties":  # heavy ties: a few integer levels, both signs and signed zeros
        x = torch.randint(-3, 4, shape, generator=gen).float()
        x[torch.rand(shape, generator=gen) < 0.1] = -0.0
    elif kind == "scaled":  # values over many binades (float16 tops out at 65504)
        hi = 10 if dtype == torch.float16 else 20
        x = torch.randn(shape, generator=gen) * torch.exp2(torch.randint(-20, hi, shape, generator=gen).float())
    else:
        x = torch.randn(shape, generator=gen)
    return x.to(dtype)


@pytest.fixture
def make_layers(seed):
    """``make_layers(dtype, big=False)``: a random list of layers — odd shapes, empty and one-element layers,
    heavy ties; ``big`` adds layers spanning several of the kernels' 65536-element work items."""
    gen = torch.Generator().manual_seed(seed)

    def make(dtype=torch.float32, big: bool = False, kinds=("normal", "ties", "scaled")):
        shapes = [(0,), (1,), (), (3, 0, 2), (7,), (5, 3), (17, 3, 3, 3), (129,), (1000, 3)]
        shapes += [(int(torch.randint(2, 300, (1,), generator=gen)),) for _ in range(6)]
        if big:
            shapes += [(3, 70001), (200003,)]
        order = torch.randperm(len(shapes), generator=gen).tolist()
        layers = []
        for i in order:
            kind = kinds[int(torch.randint(len(kinds), (1,), generator=gen))]
            layers.append(_layer(shapes[i], dtype, kind, gen))
        return layers

    return make


def assert_step_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Kernel vs reference after arithmetic: equal up to the last bit or two. The reference runs torch's
    vectorised CPU kernels, which fuse multiply-adds on AVX2; the compiled kernels (like the CUDA ones,
    built with --fmad=false) round each operation separately."""
    tol = {torch.float32: (4e-6, 1e-6), torch.float16: (2e-3, 1e-5), torch.bfloat16: (1.6e-2, 1e-5)}
    rtol, atol = tol[actual.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


# Devices the op tests run on: the CPU always, CUDA only where a GPU is visible (else a clean skip).
OP_DEVICES = ("cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                   reason="no CUDA device")))


@pytest.fixture(params=OP_DEVICES)
def op_device(request) -> torch.device:
    """The device an op test runs on (``cpu``; ``cuda`` skipped cleanly without a GPU)."""
    return torch.device(request.param)


@pytest.fixture
def compiled_backend():
    """Skips a test that exercises the compiled kernels directly when the reference back-end is active."""
    import unlearn_ext

    if unlearn_ext.build_info()["backend"] != "compiled":
        pytest.skip("compiled kernels not loaded (reference back-end)")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models or tensors (restored afterwards): they gain nothing
    from threads, and on a shared machine OpenMP's spinning makes them many times slower. Modules opt in
    with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def digits_lenet():
    """A LeNet (conv layers: MSG and CT apply) trained one epoch on the first 300 digits with a partial
    amnesiac recording: ``{"splits", "train", "model", "store"}``. Tests copy the model before changing it."""
    from unlearn_ext import data, models
    from unlearn_ext.methods import get_method
    from unlearn_ext.train import TrainConfig, train

    torch.manual_seed(0)
    splits = data.load_digits()
    train_ds = splits.train.subset(torch.arange(300))
    model = models.make_model("lenet", splits.input_shape, 10)
    rec = get_method("partial_amnesiac").recorder(model)
    train(model, data.loader(train_ds, 50, shuffle=True), TrainConfig(epochs=1, batch_size=50), recorders=[rec])
    return {"splits": splits, "train": train_ds, "model": model, "store": rec.store}
