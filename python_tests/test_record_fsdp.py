"""UpdateRecorder under FSDP2 (``torch.distributed.fsdp.fully_shard``): two gloo processes on the CPU.

Every parameter becomes a DTensor sharded on dim 0 (uneven: 7 rows split 4 + 3, and a 1-row layer that
leaves rank 1 an empty block). Each rank records the update of its blocks into its own store, with the
ids of both ranks' samples; the manifest records the blocks and the mesh. Checked against a single
process training the unsharded model on the whole batches: the blocks put together are its dense
updates, a partial store holds the per-block top-k (k = ceil(r * n_block)) of its rank's update, and
applying the rank stores — each to its own shard, or all of them to the unsharded model — removes the
steps. A second model on a 2 x 1 mesh (HSDP: replicated across the ranks) is recorded by rank 0 only, and
docs/usage.md's FSDP2 snippet runs as written."""
import copy
import functools
import json
import math
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

warnings.filterwarnings("ignore", message="unlearn_ext: compiled kernels not loaded")

from readme_snippets import loop_snippets  # noqa: E402
from stored_updates import dense_updates  # noqa: E402
from unlearn_ext import ops  # noqa: E402
from unlearn_ext.record import DiskStore, UpdateRecorder, model_fingerprint  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

RATIO = 0.25
STEPS = 4


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 1))


def _batches():
    """(x, y, ids) global batches of 16."""
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(64, 12, generator=g), torch.randn(64, 1, generator=g)
    order = torch.randperm(64, generator=torch.Generator().manual_seed(1))
    return [(x[ids], y[ids], ids) for ids in order.split(16)][:STEPS]


def _train(model, recorders, opt, part=slice(None)):
    for x, y, ids in _batches():
        opt.zero_grad()
        F.mse_loss(model(x[part]), y[part]).backward()
        for rec in recorders:
            rec.add_ids(ids[part])
        with recorders[0].step(), recorders[1].step():
            opt.step()


def _worker(rank, tmp):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=2)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        from unlearn_ext.record.sharding import block_of

        model = _model()
        fully_shard(model[0], mesh=init_device_mesh("cpu", (2,)))
        fully_shard(model, mesh=model[0].weight.device_mesh)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        recs = [UpdateRecorder(model, store=DiskStore(f"{tmp}/dense-rank{rank}.ulx"), optimizer=opt),
                UpdateRecorder(model, keep_ratio=RATIO, value_dtype=torch.float16, optimizer=opt,
                               store=DiskStore(f"{tmp}/partial-rank{rank}.ulx"))]
        assert all(r.enabled for r in recs)
        _train(model, recs, opt, slice(8 * rank, 8 * rank + 8))
        for r in recs:
            r.store.close()
        for name, p in model.named_parameters():  # the recorded block is the local tensor, where torch says
            block, local = block_of(name, p)
            assert (local, block.offset) == tuple(map(tuple, compute_local_shape_and_global_offset(
                p.shape, p.device_mesh, p.placements)))
            assert torch.equal(block.view_of(p.full_tensor(), local), p.to_local())
        final = {n: p.full_tensor() for n, p in model.named_parameters()}
        # each rank removes every step from its own shard with its own store
        store = DiskStore(f"{tmp}/dense-rank{rank}.ulx", model=model)
        store.apply(model, alpha=-1.0)
        restored = {n: p.full_tensor() for n, p in model.named_parameters()}
        with pytest.raises(ValueError, match="'0.weight': this rank holds the block at offset"):
            DiskStore(f"{tmp}/dense-rank{1 - rank}.ulx").apply(model)  # the other rank's blocks
        if rank == 0:
            torch.save({"final": final, "restored": restored}, f"{tmp}/fsdp.pt")

        hsdp = _model()  # replicated over the 2 ranks, sharded over 1: only the first replica records
        fully_shard(hsdp, mesh=init_device_mesh("cpu", (2, 1), mesh_dim_names=("replicate", "shard")))
        opt = torch.optim.SGD(hsdp.parameters(), lr=0.1, momentum=0.9)
        recs = [UpdateRecorder(hsdp, store=DiskStore(f"{tmp}/hsdp-rank{rank}.ulx")), UpdateRecorder(hsdp)]
        assert [r.enabled for r in recs] == [rank == 0] * 2
        _train(hsdp, recs, opt, slice(8 * rank, 8 * rank + 8))
        recs[0].store.close()

        # docs/usage.md's FSDP2 snippet, as written (fully_shard on a CPU mesh: gloo cannot reduce CUDA tensors)
        import torch.distributed.fsdp as fsdp

        fsdp.fully_shard = functools.partial(fully_shard, mesh=init_device_mesh("cpu", (2,)))
        os.chdir(tmp)
        half = slice(8 * rank, 8 * rank + 8)
        ns = {"model": _model(), "loader": [(x[half], y[half], ids[half]) for x, y, ids in _batches()],
              "loss_fn": F.mse_loss, "forget_ids": _batches()[1][2][:1]}
        exec(loop_snippets()["FSDP2"], ns)
        assert ns["store"].steps_containing(ns["forget_ids"]) == [1]
    finally:
        dist.destroy_process_group()


def test_fsdp2_ranks_record_their_shards_and_unlearn_them(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=2, join=True)

    model = _model()
    initial = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    single = [UpdateRecorder(model, optimizer=opt), UpdateRecorder(model, keep_ratio=RATIO)]
    _train(model, single, opt)
    single_updates = dense_updates(single[0].store)
    names = single[0].manifest.names

    dense = [DiskStore(tmp_path / f"dense-rank{r}.ulx", model=model) for r in (0, 1)]
    for r, store in enumerate(dense):
        m = store.manifest
        assert not store.dropped and m.fingerprint == model_fingerprint(model) and m.names == names
        assert (m.shards.rank, m.shards.world_size, m.shards.mesh_shape, m.shards.coordinate) == (r, 2, (2,), (r,))
        assert m.global_shapes == tuple(tuple(p.shape) for p in model.parameters())
        assert [b.placements for b in m.shards.blocks] == [("shard(0)",)] * len(names)
        assert m.shapes[0] == ((4, 12), (3, 12))[r] and m.shards.blocks[0].offset == ((0, 0), (4, 0))[r]
        assert m.shapes[-2:] == (((1, 5), (1,)), ((0, 5), (0,)))[r]  # rank 1 holds nothing of the last layer
        assert store.steps() == single[0].store.steps() == list(range(STEPS))
        for s in store.steps():  # every rank stores the ids of both ranks' halves, in rank order
            assert torch.equal(store.sample_ids(s), single[0].store.sample_ids(s))
    # the blocks of the two ranks put together are the unsharded update
    for s, want in enumerate(single_updates):
        for i, w in enumerate(want):
            got = torch.zeros_like(w)
            for store in dense:
                b = store.manifest.shards.blocks[i]
                b.view_of(got, store.manifest.shapes[i]).copy_(dense_updates(store)[s][i])
            torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-7)
    # a partial store keeps the top ceil(r * n_block) of each block: per-shard top-k
    for r in (0, 1):
        part = DiskStore(tmp_path / f"partial-rank{r}.ulx", model=model)
        for rec, blocks in zip(part.records(), dense_updates(dense[r])):
            v, i, o = ops.layerwise_topk(blocks, RATIO)
            assert torch.equal(rec.indices, i) and torch.equal(rec.offsets, o)
            assert torch.equal(rec.values, v.to(torch.float16))
            assert o.diff().tolist() == [math.ceil(RATIO * b.numel()) for b in blocks]

    saved = torch.load(tmp_path / "fsdp.pt")
    for name, p, q in zip(names, model.parameters(), initial):
        torch.testing.assert_close(saved["final"][name], p.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(saved["restored"][name], q, rtol=0, atol=1e-6)  # sharded removal
    # every rank's store applied to the unsharded model removes the whole update too
    unsharded = _model()
    with torch.no_grad():
        for p, w in zip(unsharded.parameters(), saved["final"].values()):
            p.copy_(w)
    for store in dense:
        store.apply(unsharded, [1, 3])
    single[0].store.apply(model, [1, 3])
    for p, q in zip(unsharded.parameters(), model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)

    # docs/usage.md's snippet: a store per rank, of its blocks, holding every step
    for r in (0, 1):
        readme = DiskStore(tmp_path / f"run-rank{r}.ulx", model=model)
        assert readme.manifest.shards.rank == r and readme.steps() == list(range(STEPS)) and not readme.dropped

    # HSDP: rank 0 (the first replica) recorded whole blocks, rank 1 nothing
    assert not (tmp_path / "hsdp-rank1.ulx").exists()
    hsdp = DiskStore(tmp_path / "hsdp-rank0.ulx", model=model)
    assert hsdp.manifest.shards.mesh_shape == (2, 1) and hsdp.manifest.shards.mesh_dim_names == ("replicate", "shard")
    assert hsdp.manifest.shards.blocks[0].placements == ("replicate", "shard(0)")
    assert hsdp.manifest.shapes == hsdp.manifest.global_shapes
    for s, (got, want) in enumerate(zip(dense_updates(hsdp), single_updates)):
        assert torch.equal(hsdp.sample_ids(s), single[0].store.sample_ids(s))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)

    # `unlearn-ext forget` with both ranks' stores on the unsharded checkpoint: the same model as applying them
    from unlearn_ext.deletion.commands import forget_main

    checkpoint = _model()
    checkpoint.load_state_dict(saved["final"])
    torch.save(checkpoint.state_dict(), tmp_path / "unsharded.pt")
    forget_ids = torch.cat([dense[0].sample_ids(1)[:1], dense[0].sample_ids(3)[:1]])
    (tmp_path / "ids.txt").write_text("\n".join(map(str, forget_ids.tolist())))
    assert sorted(set(dense[0].steps_containing(forget_ids))) == [1, 3]
    assert forget_main(["--store", str(tmp_path / "dense-rank0.ulx"), "--store", str(tmp_path / "dense-rank1.ulx"),
                        "--checkpoint", str(tmp_path / "unsharded.pt"), "--ids", str(tmp_path / "ids.txt"),
                        "--out", str(tmp_path / "forgot.pt"), "--max-undone", "1", "--new-log"]) == 0
    forgot = torch.load(tmp_path / "forgot.pt")
    assert all(torch.equal(forgot[n], p.detach()) for n, p in unsharded.named_parameters())

def test_a_sharded_manifest_round_trips_and_a_bad_layout_is_named():
    from unlearn_ext.record import Manifest
    from unlearn_ext.record.sharding import LayerBlock, ShardLayout

    blocks = (LayerBlock((7, 12), (4, 0), ("shard(0)",)), LayerBlock((7,), (4,), ("shard(0)",)))
    m = Manifest(("0.weight", "0.bias"), ((3, 12), (3,)), ("float32", "float32"), 0.25, "float16",
                 "0123456789abcdef", ShardLayout(1, 2, (2,), ("dp",), (1,), blocks))
    assert Manifest.from_json(m.to_json()) == m
    assert b"shards" not in Manifest.from_model(_model()).to_json()  # unsharded manifests are unchanged
    good = json.loads(m.to_json())
    bad = [("world_size", 1, "shards.rank"), ("mesh", {"shape": [2], "coordinate": [2], "dim_names": None},
                                               "shards.mesh.coordinate"),
           ("layers", good["shards"]["layers"][:1], "shards.layers"),
           ("layers", [dict(good["shards"]["layers"][0], offset=[5, 0]), good["shards"]["layers"][1]],
            r"shards.layers\[0\]"),
           ("layers", [dict(good["shards"]["layers"][0], placements=["shard(2)"]), good["shards"]["layers"][1]],
            r"shards.layers\[0\].placements"),
           ("layers", [dict(good["shards"]["layers"][0], placements=["replicate"]), good["shards"]["layers"][1]],
            "shards.layers' layer 1 is replicated on mesh dimensions")]
    for key, value, field in bad:
        d = copy.deepcopy(good)
        d["shards"][key] = value
        with pytest.raises(ValueError, match=f"store.ulx: the manifest's field '{field}"):
            Manifest.from_json(json.dumps(d).encode(), "store.ulx")


def test_layouts_that_cannot_be_recorded_or_applied_are_refused(tmp_path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Partial, Shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        plain_store = UpdateRecorder(_model()).store
        model = _model()
        fully_shard(model, mesh=mesh)
        with pytest.raises(ValueError, match="'0.weight' is a DTensor shard but the store holds whole layers"):
            plain_store.apply(model)
        model.add_module("head", nn.Linear(1, 2))  # an ordinary parameter beside the shards
        with pytest.raises(ValueError, match="'head.weight' is an ordinary tensor but '0.weight' is a DTensor"):
            UpdateRecorder(model)
        odd = _model()
        fully_shard(odd, mesh=mesh)
        odd[4].weight = nn.Parameter(DTensor.from_local(torch.zeros(1, 5), mesh, [Partial()]))
        with pytest.raises(ValueError, match="'4.weight' has the placement P.* on mesh dimension 0"):
            UpdateRecorder(odd)
        odd[4].weight = nn.Parameter(DTensor.from_local(torch.zeros(1, 5), mesh, [Shard(0)], shape=(3, 5),
                                                        stride=(5, 1)))  # a local tensor that is no block
        with pytest.raises(ValueError, match=r"'4.weight': its local tensor has shape \(1, 5\), but its placements"):
            UpdateRecorder(odd)
    finally:
        dist.destroy_process_group()

