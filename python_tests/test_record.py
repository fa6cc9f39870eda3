"""UpdateRecorder, its encodings and stores (docs/store-format.md): round trips, exact byte accounting, amnesiac
removal of every step, partial = dense at r = 1, sample-id lookup and fingerprints. DDP is in
test_record_ddp.py, faults (kills, corruption, full disk, refusals) in test_store_faults.py."""
import copy
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

warnings.filterwarnings("ignore", message="unlearn_ext: compiled kernels not loaded")

from unlearn_ext import ops  # noqa: E402
from unlearn_ext.data.core import IndexedTensorDataset, loader  # noqa: E402
from unlearn_ext.record import (BITMASK, EMPTY, FULL, INDEX, DiskStore, Manifest, MemoryStore,  # noqa: E402
                                UpdateRecorder, model_fingerprint)
from unlearn_ext.record import encoding  # noqa: E402
from unlearn_ext.train import TrainConfig, train  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

NUMELS = [1, 7, 8, 9, 64, 100, 1000, 4097]


def _random_update(numels, densities, gen):
    """(values, indices, offsets) with round(d·n) entries per layer at random ascending positions."""
    values, indices, offsets = [], [], [0]
    for n, d in zip(numels, densities):
        k = min(n, round(d * n))
        idx = torch.sort(torch.randperm(n, generator=gen)[:k]).values
        values.append(torch.randn(k, generator=gen))
        indices.append(idx.to(torch.int32))
        offsets.append(offsets[-1] + k)
    return torch.cat(values), torch.cat(indices), torch.tensor(offsets, dtype=torch.int64)


@pytest.mark.parametrize("density", [0.0, 0.01, 0.03, 0.2, 0.9, 1.0, "mixed"])
def test_encoding_round_trip_and_byte_accounting(density):
    gen = torch.Generator().manual_seed(1)
    updates = []
    for b in range(3):
        ds = (torch.rand(len(NUMELS), generator=gen).tolist() if density == "mixed"
              else [density] * len(NUMELS))
        if density == "mixed":  # make sure every kind appears
            ds[0], ds[1], ds[-1] = 0.0, 1.0, 0.01
        updates.append(_random_update(NUMELS, ds, gen))
    encs = [encoding.encode(v, i, o, NUMELS) for v, i, o in updates]
    for (v, i, o), enc in zip(updates, encs):
        got = encoding.decode(enc, NUMELS)
        for a, b in zip(got, (v, i, o)):
            assert torch.equal(a, b)
        counts = o.diff().tolist()
        for kind, k, n in zip(enc.kinds.tolist(), counts, NUMELS):
            # the chosen encoding is the smallest one that can hold the segment
            sizes = {INDEX: 4 * k, BITMASK: (n + 7) // 8}
            if k == 0:
                assert kind == EMPTY
            elif k == n:
                assert kind == FULL
            else:
                assert sizes[kind] == min(sizes.values())
        by_kind = encoding.nbytes_by_kind(enc.kinds.tolist(), counts, NUMELS, 4)
        assert sum(by_kind.values()) == enc.values.numel() * 4 + enc.index.numel() * 4 + enc.mask.numel()
    # a batch of updates decodes as one (values, indices, offsets) with B·L+1 offsets
    v, i, o = encoding.decode(encoding.Encoded.cat(encs), NUMELS)
    assert o.numel() == 3 * len(NUMELS) + 1
    assert torch.equal(v, torch.cat([u[0] for u in updates]))
    assert torch.equal(i, torch.cat([u[1] for u in updates]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cpu_and_gpu_structure_builders_agree(seed):
    """encode() builds index/mask one segment at a time in numpy on the CPU and with vectorised tensor
    ops on a GPU; both must give the same bytes (the vectorised one runs here on the CPU)."""
    gen = torch.Generator().manual_seed(seed)
    for b in range(4):
        ds = torch.rand(len(NUMELS), generator=gen).tolist()
        ds[b % len(NUMELS)] = 1.0
        v, i, o = _random_update(NUMELS, ds, gen)
        off = o.tolist()
        counts = o.diff()
        kinds = [encoding.choose_kind(c, n) for c, n in zip(counts.tolist(), NUMELS)]
        kinds_t = torch.tensor(kinds, dtype=torch.uint8)
        by_segment = encoding._structure_by_segment(i, off, kinds, NUMELS)
        vectorised = encoding._structure_vectorised(i, counts, kinds_t, kinds, NUMELS)
        for a, c in zip(by_segment, vectorised):
            assert a.dtype == c.dtype and torch.equal(a, c)


def test_dense_encoding_stores_no_indices():
    values = torch.randn(sum(NUMELS))
    offsets = torch.tensor([0] + NUMELS).cumsum(0)
    enc = encoding.encode(values, None, offsets, NUMELS)
    assert enc.kinds.tolist() == [FULL] * len(NUMELS) and enc.index.numel() == 0 and enc.mask.numel() == 0
    v, i, o = encoding.decode(enc, NUMELS)
    assert torch.equal(v, values) and torch.equal(o, offsets)
    assert torch.equal(i, torch.cat([torch.arange(n, dtype=torch.int32) for n in NUMELS]))


def test_decode_rejects_inconsistent_bitmask():
    v, i, o = _random_update([1000], [0.3], torch.Generator().manual_seed(0))
    enc = encoding.encode(v, i, o, [1000])
    assert enc.kinds.tolist() == [BITMASK]
    enc.mask[0] ^= 0xFF  # flips marked entries without changing the count
    with pytest.raises(ValueError, match="inconsistent"):
        encoding.decode(enc, [1000])


# -- the recorder on a real training loop -----------------------------------------------------------

def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 4))


def _data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return IndexedTensorDataset(torch.randn(n, 12, generator=g), torch.randint(0, 4, (n,), generator=g))


def _train(model, recorders, optimizer="sgd", epochs=2, batch=16, lr=0.05):
    cfg = TrainConfig(epochs=epochs, batch_size=batch, lr=lr, optimizer=optimizer, momentum=0.9)
    train(model, loader(_data(), batch_size=batch, shuffle=True, seed=3), cfg, recorders=recorders)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_removing_every_dense_step_restores_the_initial_weights(optimizer, tmp_path):
    model = _mlp()
    initial = copy.deepcopy(model)
    with DiskStore(tmp_path / "run.ulx") as disk:
        recs = [UpdateRecorder(model), UpdateRecorder(model, store=disk)]
        _train(model, recs, optimizer)
    assert len(recs[0].store) == 2 * 96 // 16
    for store in (recs[0].store, DiskStore(tmp_path / "run.ulx", model=model)):
        unlearned = copy.deepcopy(model)
        stats = store.apply(unlearned, alpha=-1.0)
        assert stats["calls"] == 1 and stats["steps"] == len(store)
        for (name, p), q in zip(unlearned.named_parameters(), initial.parameters()):
            assert torch.allclose(p, q, rtol=0, atol=1e-6), name
        assert not torch.equal(unlearned[0].weight, model[0].weight)


def test_apply_split_into_bounded_groups_matches_one_call():
    model = _mlp()
    rec = UpdateRecorder(model, keep_ratio=0.3)
    _train(model, [rec])
    store = rec.store
    per_step = max(store._recs[store._position(s)].entries for s in store.steps())
    one, split = copy.deepcopy(model), copy.deepcopy(model)
    assert store.apply(one, alpha=-1.0)["calls"] == 1
    stats = store.apply(split, alpha=-1.0, max_batch_entries=per_step + 1)
    assert stats["calls"] == len(store)  # each group holds exactly one record
    for p, q in zip(split.parameters(), one.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert not torch.equal(one[0].weight, model[0].weight)


def test_partial_ratio_one_equals_dense_exactly():
    model = _mlp()
    dense, partial = UpdateRecorder(model), UpdateRecorder(model, keep_ratio=1.0)
    _train(model, [dense, partial], "adam")
    steps = dense.store.steps()
    assert partial.store.steps() == steps
    for a, b in zip(dense.store.load_batch(steps), partial.store.load_batch(steps)):
        assert torch.equal(a, b)
    payload = ("index", "bitmask", "full")
    assert [dense.store.encoding_nbytes()[k] for k in payload] == [partial.store.encoding_nbytes()[k] for k in payload]


def test_partial_records_the_layerwise_topk_of_the_update():
    model = _mlp()
    ratio = 0.1
    rec = UpdateRecorder(model, keep_ratio=ratio, value_dtype=torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 12), torch.randint(0, 4, (16,))
    before = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(model(x), y).backward()
    with rec.step(torch.arange(16)):
        opt.step()
    after = [p.detach() for p in model.parameters()]
    expected = ops.reference.layerwise_topk(after, ratio, True, before)
    (got,) = rec.store.records()
    for a, b in zip(got[2:], expected):
        assert torch.equal(a, b)
    counts = got.offsets.diff().tolist()
    assert counts == [ops.keep_count(p.numel(), ratio) for p in after]
    # only the kept entries are stored, with index encoding below ~3 % and bitmask above
    enc_bytes = rec.store.encoding_nbytes()
    assert enc_bytes["full"] == 0 and enc_bytes["index"] + enc_bytes["bitmask"] > 0


@pytest.mark.parametrize("value_dtype", [torch.float16, torch.bfloat16])
def test_half_precision_value_storage(value_dtype, tmp_path):
    model = _mlp()
    full = UpdateRecorder(model, keep_ratio=0.5)
    half_mem = UpdateRecorder(model, keep_ratio=0.5, value_dtype=value_dtype)
    half_disk = UpdateRecorder(model, keep_ratio=0.5, value_dtype=value_dtype, store=DiskStore(tmp_path / "h.ulx"))
    _train(model, [full, half_mem, half_disk], "sgd")
    half_disk.store.close()
    steps = full.store.steps()
    v32, i32, o32 = full.store.load_batch(steps)
    for store in (half_mem.store, DiskStore(tmp_path / "h.ulx")):
        v, i, o = store.load_batch(steps)
        assert v.dtype == value_dtype
        assert torch.equal(v, v32.to(value_dtype)) and torch.equal(i, i32) and torch.equal(o, o32)
        # the same structures, 2 bytes a value instead of 4
        payload = {k: store.encoding_nbytes()[k] for k in ("index", "bitmask", "full")}
        full_payload = {k: full.store.encoding_nbytes()[k] for k in payload}
        assert sum(payload.values()) == sum(full_payload.values()) - 2 * v.numel()
    # applying the fp16/bf16 copy lands within half-precision rounding of applying the fp32 one
    unlearned, ref = copy.deepcopy(model), copy.deepcopy(model)
    half_mem.store.apply(unlearned)
    full.store.apply(ref)
    bound = len(steps) * float(v32.abs().max()) * torch.finfo(value_dtype).eps
    for p, q in zip(unlearned.parameters(), ref.parameters()):
        assert float((p - q).detach().abs().max()) <= bound


def test_steps_containing_and_only_ids():
    model = _mlp()
    deletable = torch.tensor([5, 40, 77])
    every, some = UpdateRecorder(model, keep_ratio=0.2), UpdateRecorder(model, keep_ratio=0.2, only_ids=deletable)
    batches = []
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        for ids in torch.randperm(96, generator=g).split(16):
            batches.append(set(ids.tolist()))
            x, y = _data().x[ids], _data().y[ids]
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            with every.step(ids), some.step(ids):
                opt.step()
    assert every.store.steps() == list(range(len(batches)))
    for query in ([5], [5, 40], [0, 1, 2, 3], [1000], []):
        expected = [s for s, b in enumerate(batches) if b & set(query)]
        assert every.store.steps_containing(query) == expected
        assert every.store.steps_containing(torch.tensor(query, dtype=torch.int64)) == expected
    # only batches holding a deletable sample are recorded, numbered by optimizer step
    assert some.store.steps() == [s for s, b in enumerate(batches) if b & set(deletable.tolist())]
    assert some.store.steps_containing(deletable) == some.store.steps()
    for s in some.store.steps():
        assert set(some.store.sample_ids(s).tolist()) == batches[s]
    assert some.step_count == every.step_count == len(batches)


class _PartlyFrozen(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.frozen = nn.Linear(6, 6)
        self.used = nn.Linear(6, 3)
        self.unused = nn.Linear(6, 3)  # trainable but never in the forward pass: no gradient
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.used(self.frozen(x))


@pytest.mark.parametrize("keep_ratio", [None, 0.5])
def test_frozen_layers_are_not_recorded_and_unchanged_ones_store_nothing(keep_ratio):
    model = _PartlyFrozen()
    rec = UpdateRecorder(model, keep_ratio=keep_ratio)
    assert rec.manifest.names == ("used.weight", "used.bias", "unused.weight", "unused.bias")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    F.cross_entropy(model(torch.randn(4, 6)), torch.tensor([0, 1, 2, 0])).backward()
    with rec.step([1, 2, 3, 4]):
        opt.step()
    (got,) = rec.store.records()
    counts = got.offsets.diff().tolist()
    assert counts[2:] == [0, 0]  # zero-length segments for the layer that did not change
    assert counts[:2] == ([18, 3] if keep_ratio is None else [9, 2])
    m = rec.store.manifest
    kinds_bytes = rec.store.encoding_nbytes()
    assert sum(kinds_bytes[k] for k in ("index", "bitmask", "full")) == 4 * sum(counts) + (
        0 if keep_ratio is None else 3 + 1)  # bitmasks of the partial layers: ceil(18/8) + ceil(3/8)
    # removing the step restores the used layer, leaves the others alone
    before = copy.deepcopy(model)
    rec.store.apply(model)
    assert not torch.equal(model.used.weight, before.used.weight)
    assert torch.equal(model.unused.weight, before.unused.weight) and torch.equal(model.frozen.weight,
                                                                                  before.frozen.weight)
    assert len(m.names) == 4


@pytest.mark.parametrize("keep_ratio", [None, 0.3])
def test_apply_to_a_channels_last_model_equals_the_contiguous_result(keep_ratio):
    """Issue 14: a channels_last model recorded fine, but applying its store raised "dense[0] is not
    contiguous". Stored indices count in logical order; apply updates such a parameter through a
    contiguous copy, so the result equals the contiguous model's and the memory format is kept."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten(), nn.Linear(64, 2))
    model = model.to(memory_format=torch.channels_last)
    rec = UpdateRecorder(model, keep_ratio=keep_ratio)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        x = torch.randn(4, 3, 8, 8, generator=g).to(memory_format=torch.channels_last)
        opt.zero_grad()
        F.cross_entropy(model(x), torch.randint(0, 2, (4,), generator=g)).backward()
        with rec.step([step]):
            opt.step()
    last = copy.deepcopy(model)
    contiguous = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    assert not last[0].weight.is_contiguous() and contiguous[0].weight.is_contiguous()
    for m in (last, contiguous):
        rec.store.apply(m, [0, 2])
    assert last[0].weight.is_contiguous(memory_format=torch.channels_last)
    for p, q in zip(last.parameters(), contiguous.parameters()):
        assert torch.equal(p, q)
    assert not torch.equal(last[0].weight, model[0].weight)


def test_fingerprint_mismatch_raises(tmp_path):
    model, other = _mlp(), nn.Sequential(nn.Linear(12, 33), nn.Tanh(), nn.Linear(33, 4))
    with DiskStore(tmp_path / "a.ulx") as store:
        _train(model, [UpdateRecorder(model, keep_ratio=0.1, store=store)], epochs=1)
    fp, other_fp = model_fingerprint(model), model_fingerprint(other)
    assert fp != other_fp and fp == model_fingerprint(copy.deepcopy(model))
    with pytest.raises(ValueError, match=f"{fp}.*{other_fp}"):
        DiskStore(tmp_path / "a.ulx", model=other)
    store = DiskStore(tmp_path / "a.ulx", model=model)
    with pytest.raises(ValueError, match=other_fp):
        store.apply(other)
    with pytest.raises(ValueError, match=other_fp):
        UpdateRecorder(other, keep_ratio=0.1, store=store)
    with pytest.raises(ValueError, match="keep_ratio"):  # same model, other settings
        UpdateRecorder(model, keep_ratio=0.2, store=store)
    # freezing a layer after training does not change the fingerprint
    model[0].requires_grad_(False)
    store.check_model(model)


def test_memory_and_disk_stores_agree_and_resume(tmp_path):
    path = tmp_path / "run.ulx"
    model = _mlp()
    mem = UpdateRecorder(model, keep_ratio=0.05, value_dtype=torch.float16)
    disk = UpdateRecorder(model, keep_ratio=0.05, value_dtype=torch.float16, store=DiskStore(path, max_pending=2))
    _train(model, [mem, disk], epochs=1)
    disk.store.close()  # the closed file's size includes its trailer, which both stores count
    assert disk.store.nbytes() == mem.store.nbytes() == os.path.getsize(path)
    assert disk.store.encoding_nbytes() == mem.store.encoding_nbytes()
    steps = mem.store.steps()
    for a, b in zip(mem.store.load_batch(steps), disk.store.load_batch(steps)):
        assert torch.equal(a, b)
    # a new run appends to the same file, numbering steps after the stored ones
    with DiskStore(path, model=model) as store:
        rec = UpdateRecorder(model, keep_ratio=0.05, value_dtype=torch.float16, store=store)
        assert rec.step_count == len(steps)
        _train(model, [rec], epochs=1)
    reopened = DiskStore(path)
    assert reopened.steps() == list(range(2 * len(steps))) and not reopened.dropped
    assert reopened.dense_equivalent_nbytes() == 2 * len(steps) * 4 * sum(p.numel() for p in model.parameters())


def test_append_checks_its_input():
    model = _mlp()
    store = MemoryStore()
    with pytest.raises(ValueError, match="manifest"):
        store.append(0, [1], torch.zeros(1), torch.zeros(1, dtype=torch.int32), torch.tensor([0, 1]))
    store.bind(Manifest.from_model(model))
    v, i, o = ops.layerwise_topk([p.detach() for p in model.parameters()], 0.1)
    store.append(3, [1], v, i, o)
    with pytest.raises(ValueError, match="steps must increase"):
        store.append(3, [1], v, i, o)
    with pytest.raises(ValueError, match="layers"):
        store.append(4, [1], v, i, o[:-1])
    with pytest.raises(ValueError, match="not in"):
        store.load_batch([5])
    with pytest.raises(ValueError, match="value_dtype"):
        UpdateRecorder(model, value_dtype=torch.float64)
    with pytest.raises(ValueError, match="keep_ratio"):
        UpdateRecorder(model, keep_ratio=0.0)


def test_zero_entries_are_dropped_where_that_is_smaller():
    """Dense input: a layer with a few zeros stays FULL (zeros included, a bitmask would cost more), one
    with many zeros drops them, an unchanged one is EMPTY; sparse input always drops them — and the
    partial path at r = 1 chooses exactly like the dense one."""
    numels = [1000, 1000, 1000, 4096]
    layers = [torch.randn(n) for n in numels]
    layers[0][:10] = 0  # 1 % zeros: FULL keeps them
    layers[1][100:] = 0  # 90 % zeros: BITMASK of the 100 non-zeros
    layers[2][:] = 0  # unchanged: EMPTY
    layers[3][5:] = 0  # 5 of 4096 left: INDEX
    values = torch.cat(layers)
    offsets = torch.tensor([0] + numels).cumsum(0)
    for value_dtype in (torch.float32, torch.float16):
        enc = encoding.encode(values, None, offsets, numels, value_dtype, drop_zeros=True)
        assert enc.kinds.tolist() == [FULL, BITMASK, EMPTY, INDEX]
        assert enc.counts.tolist() == [1000, 100, 0, 5]
        v, i, o = encoding.decode(enc, numels)
        dense = [torch.zeros(n) for n in numels]
        ops.sparse_accumulate_(dense, v.float(), i, o)
        for a, b in zip(dense, layers):
            assert torch.equal(a, b.to(value_dtype).float())
        # the same update given as a full-ratio top-k (every entry, with indices) encodes identically
        idx = torch.cat([torch.arange(n, dtype=torch.int32) for n in numels])
        enc2 = encoding.encode(values, idx, offsets, numels, value_dtype, drop_zeros=True)
        for f in ("kinds", "counts", "values", "index", "mask"):
            assert torch.equal(getattr(enc, f), getattr(enc2, f)), f
    # a partial segment drops its zeros whatever their number
    v, i, o = torch.tensor([0.5, 0.0, 2.0]), torch.tensor([3, 7, 9], dtype=torch.int32), torch.tensor([0, 3])
    enc = encoding.encode(v, i, o, [10], drop_zeros=True)
    assert enc.counts.tolist() == [2] and enc.values.tolist() == [0.5, 2.0]
