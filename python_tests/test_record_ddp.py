"""UpdateRecorder under DistributedDataParallel: two gloo processes on the CPU (torch.multiprocessing spawn,
world size 2). After DDP's all-reduce every rank applies the same update, so rank 0 records it — with the
sample ids of *both* ranks' halves of the batch — and the other ranks write nothing. The store must equal
the one a single process records on the whole batches."""
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

warnings.filterwarnings("ignore", message="unlearn_ext: compiled kernels not loaded")

from stored_updates import dense_updates  # noqa: E402
from unlearn_ext import ops  # noqa: E402
from unlearn_ext.data.core import IndexedTensorDataset  # noqa: E402
from unlearn_ext.record import DiskStore, UpdateRecorder  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

RATIO = 0.25


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 4))


def _batches():
    """(x, y, ids) global batches of 16, two epochs of 64 samples."""
    g = torch.Generator().manual_seed(5)
    data = IndexedTensorDataset(torch.randn(64, 12, generator=g), torch.randint(0, 4, (64,), generator=g))
    order = torch.randperm(64, generator=torch.Generator().manual_seed(1))
    return [(data.x[ids], data.y[ids], ids) for ids in order.split(16)] * 2


def _worker(rank, tmp):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=2)
    try:
        model = nn.parallel.DistributedDataParallel(_mlp())
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        # Every rank runs the same code; only rank 0's recorders touch their stores.
        dense = UpdateRecorder(model, store=DiskStore(f"{tmp}/dense-rank{rank}.ulx"))
        partial = UpdateRecorder(model, keep_ratio=RATIO, value_dtype=torch.float16,
                                 store=DiskStore(f"{tmp}/partial-rank{rank}.ulx"))
        assert dense.enabled == partial.enabled == (rank == 0)
        for x, y, ids in _batches():
            half = slice(8 * rank, 8 * rank + 8)
            opt.zero_grad()
            F.cross_entropy(model(x[half]), y[half]).backward()
            with dense.step(ids[half]), partial.step(ids[half]):
                opt.step()
        dense.store.close()
        partial.store.close()
        assert dense.step_count == partial.step_count == len(_batches())
    finally:
        dist.destroy_process_group()


def test_ddp_rank0_store_equals_single_process_store(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=2, join=True)
    assert not (tmp_path / "dense-rank1.ulx").exists() and not (tmp_path / "partial-rank1.ulx").exists()

    model = _mlp()
    single = UpdateRecorder(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, y, ids in _batches():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with single.step(ids):
            opt.step()

    ddp = DiskStore(tmp_path / "dense-rank0.ulx", model=model)  # DDP's "module." prefix is not in the names
    assert ddp.manifest == single.store.manifest and not ddp.dropped
    assert ddp.steps() == single.store.steps() == list(range(8))
    for s in ddp.steps():  # rank 0 recorded the ids of both ranks' halves, in rank order
        assert torch.equal(ddp.sample_ids(s), single.store.sample_ids(s))
    assert ddp.steps_containing([3, 60]) == single.store.steps_containing([3, 60])
    ddp_dense = dense_updates(ddp)
    for a, b in zip(ddp_dense, dense_updates(single.store)):
        for x, y in zip(a, b):  # equal up to the rounding of averaging two half-batch gradients
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)

    # rank 0's partial store holds exactly the layer-wise top-k (fp16) of rank 0's dense updates
    part = DiskStore(tmp_path / "partial-rank0.ulx", model=model)
    assert part.steps() == ddp.steps()
    for rec, dense in zip(part.records(), ddp_dense):
        v, i, o = ops.layerwise_topk(dense, RATIO)
        assert torch.equal(rec.indices, i) and torch.equal(rec.offsets, o)
        assert torch.equal(rec.values, v.to(torch.float16))
        assert torch.equal(rec.sample_ids, ddp.sample_ids(rec.step))
