"""What opening a DiskStore file says about it (issue 14): a cut exactly at a record boundary, a trailer
whose count the records contradict, a format-1 file (before the trailer), a manifest tampered with
behind a valid checksum, and a record holding NaN or infinity behind valid checksums."""
import copy
import json
import re
import struct
import warnings
import zlib

import pytest
import torch
from torch import nn

warnings.filterwarnings("ignore", message="unlearn_ext: compiled kernels not loaded")

from unlearn_ext.record import DiskStore, Manifest, UpdateRecorder  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

N_STEPS = 6
HEADER = struct.Struct("<8sIII")  # the file header (disk_format.py)
TRAILER_SIZE = 16


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))


def _record(path, keep_ratio=0.5, value_dtype=torch.float32) -> DiskStore:
    """Train ``_model()`` for N_STEPS SGD steps recorded into a closed file at ``path``; the store reopened."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    with DiskStore(path) as store:
        rec = UpdateRecorder(model, keep_ratio=keep_ratio, value_dtype=value_dtype, store=store)
        for step in range(N_STEPS):
            x, y = torch.randn(4, 8, generator=g), torch.randint(0, 3, (4,), generator=g)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            with rec.step(torch.arange(4 * step, 4 * step + 4)):
                opt.step()
    return DiskStore(path)


def _open_warning(path, **kw):
    with pytest.warns(RuntimeWarning) as caught:
        store = DiskStore(path, **kw)
    return store, " ".join(str(w.message) for w in caught)


# -- the trailer ----------------------------------------------------------------------------------------

def test_a_cut_exactly_at_a_record_boundary_is_reported(tmp_path):
    """Issue 14: a file cut between two records opened with fewer records and `dropped` said nothing.
    No checksum can see that cut; the missing trailer does."""
    path = tmp_path / "s.ulx"
    full = _record(path)
    assert not full.dropped and full.dropped.expected == N_STEPS
    data, rec = path.read_bytes(), next(full.records([3]))
    boundary = full._where[3][0]  # records 3.. and the trailer cut off
    path.write_bytes(data[:boundary])
    store, message = _open_warning(path)
    assert store.steps() == [0, 1, 2]
    assert store.dropped and store.dropped.unclean and not store.dropped.regions
    assert "not closed cleanly" in message and "last at step 2" in message
    assert "not closed cleanly" in str(store.dropped)
    with pytest.warns(RuntimeWarning, match="not closed cleanly"):
        DiskStore(path, strict=True)  # a missing trailer alone is no damage: strict opens it too
    # appending and closing makes it whole again
    with pytest.warns(RuntimeWarning), DiskStore(path) as again:
        again.append(3, rec.sample_ids, rec.values, rec.indices, rec.offsets)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        closed = DiskStore(path)
    assert closed.steps() == [0, 1, 2, 3] and not closed.dropped and closed.dropped.expected == 4


def test_a_trailer_contradicted_by_the_records_is_reported(tmp_path):
    """A whole record cut out of the middle of a closed file (every checksum left intact): the trailer's
    count says a record is missing."""
    path = tmp_path / "s.ulx"
    full = _record(path)
    lo, size = full._where[2]
    data = path.read_bytes()
    path.write_bytes(data[:lo] + data[lo + size:])
    store, message = _open_warning(path)
    assert store.steps() == [0, 1, 3, 4, 5] and not store.dropped.regions and not store.dropped.unclean
    assert store.dropped.count_mismatch and (store.dropped.expected, store.dropped.kept) == (N_STEPS, N_STEPS - 1)
    assert f"trailer says it holds {N_STEPS} records, so 1 record(s) are missing" in message
    with pytest.raises(ValueError, match="counts 6 records but 5 are intact"):
        DiskStore(path, strict=True)


def test_a_format_1_file_opens_without_a_verdict_and_is_upgraded_by_appending(tmp_path):
    """Files written before the trailer (format 1) open as before — nothing said about how they were
    closed; appending rewrites the version to 2 and closing writes the trailer."""
    path = tmp_path / "s.ulx"
    full = _record(path)
    data = bytearray(path.read_bytes()[:-TRAILER_SIZE])
    struct.pack_into("<I", data, 8, 1)
    path.write_bytes(bytes(data))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        old = DiskStore(path)
    assert old.steps() == list(range(N_STEPS)) and not old.dropped and old.dropped.expected is None
    old.append(N_STEPS, [99], *next(full.records([0]))[2:])
    old.close()
    assert HEADER.unpack_from(path.read_bytes())[1] == 2
    reopened = DiskStore(path)
    assert len(reopened) == N_STEPS + 1 and not reopened.dropped and reopened.dropped.expected == N_STEPS + 1


# -- the manifest ---------------------------------------------------------------------------------------

def _with_manifest(path, raw: bytes) -> None:
    """Replace the file's manifest by ``raw``, with a valid checksum (and no records: they would not
    matter, the manifest is read first)."""
    data = path.read_bytes()
    _, version, mlen, _ = HEADER.unpack_from(data)
    path.write_bytes(HEADER.pack(b"ULXSTORE", version, len(raw), zlib.crc32(raw)) + raw + data[HEADER.size + mlen:])


def _tampered(manifest: dict, how: str):
    m = copy.deepcopy(manifest)
    layer = m["layers"][0]
    edits = {
        "no layers": lambda: m.pop("layers"),
        "layers not a list": lambda: m.update(layers={"a": 1}),
        "empty layers": lambda: m.update(layers=[]),
        "layer not an object": lambda: m["layers"].__setitem__(0, "0.weight"),
        "layer without shape": lambda: layer.pop("shape"),
        "name a number": lambda: layer.update(name=3),
        "repeated name": lambda: m["layers"][1].update(name=layer["name"]),
        "shape a string": lambda: layer.update(shape="16x8"),
        "negative dimension": lambda: layer.update(shape=[-1, 8]),
        "float dimension": lambda: layer.update(shape=[16.0, 8]),
        "huge layer": lambda: layer.update(shape=[2**20, 2**20]),
        "integer dtype": lambda: layer.update(dtype="int64"),
        "unknown dtype": lambda: layer.update(dtype="float99"),
        "dtype not a string": lambda: layer.update(dtype=None),
        "keep_ratio too big": lambda: m.update(keep_ratio=2.0),
        "keep_ratio a string": lambda: m.update(keep_ratio="0.5"),
        "value_dtype float64": lambda: m.update(value_dtype="float64"),
        "fingerprint a number": lambda: m.update(fingerprint=5),
        "fingerprint not hex": lambda: m.update(fingerprint="zz" * 8),
        "unknown field": lambda: m.update(extra=1),
    }
    edits[how]()
    return m


FIELDS = {"no layers": "layers", "layers not a list": "layers", "empty layers": "layers",
          "layer not an object": "layers[0]", "layer without shape": "layers[0]", "name a number": "layers[0].name",
          "repeated name": "layers[1].name", "shape a string": "layers[0].shape",
          "negative dimension": "layers[0].shape", "float dimension": "layers[0].shape",
          "huge layer": "layers[0].shape", "integer dtype": "layers[0].dtype", "unknown dtype": "layers[0].dtype",
          "dtype not a string": "layers[0].dtype", "keep_ratio too big": "keep_ratio",
          "keep_ratio a string": "keep_ratio", "value_dtype float64": "value_dtype",
          "fingerprint a number": "fingerprint", "fingerprint not hex": "fingerprint", "unknown field": "extra"}


@pytest.mark.parametrize("how", list(FIELDS))
def test_a_tampered_manifest_raises_value_error_naming_the_field(how, tmp_path):
    """Issue 14: a manifest changed behind a valid checksum gave AttributeError/KeyError/TypeError (or was
    accepted); every field is checked, the ValueError names the file and the field."""
    path = tmp_path / "s.ulx"
    with DiskStore(path) as store:
        store.bind(Manifest.from_model(_model(), keep_ratio=0.5))
    manifest = json.loads(Manifest.from_model(_model(), keep_ratio=0.5).to_json())
    _with_manifest(path, json.dumps(_tampered(manifest, how)).encode())
    with pytest.raises(ValueError, match=re.escape(f"s.ulx: the manifest's field '{FIELDS[how]}'")):
        DiskStore(path)


@pytest.mark.parametrize("raw", [b"\xff\xfe not utf-8", b"{not json", b"[1, 2]"])
def test_a_manifest_that_is_no_json_object_raises_value_error(raw, tmp_path):
    path = tmp_path / "s.ulx"
    with DiskStore(path) as store:
        store.bind(Manifest.from_model(_model()))
    _with_manifest(path, raw)
    with pytest.raises(ValueError, match=r"s\.ulx: the manifest is not"):
        DiskStore(path)


# -- non-finite records ---------------------------------------------------------------------------------

def _poison(path, where, value: float, dtype: torch.dtype) -> None:
    """Overwrite the first stored value of the record at ``where`` = (offset, size) — a dense record, so
    its values follow its metadata — with ``value``, and fix both checksums."""
    data = bytearray(path.read_bytes())
    offset, size = where
    body = offset + 20
    _, n_ids, n_layers = struct.unpack_from("<qII", data, body)
    assert 1 not in data[body + 16:body + 16 + n_layers]  # no INDEX segment: its indices would come first
    first_value = body + 16 + ((n_layers + 7) & ~7) + 8 * n_layers + 8 * n_ids
    data[first_value:first_value + dtype.itemsize] = torch.tensor([value], dtype=dtype).view(torch.uint8).tolist()
    struct.pack_into("<I", data, offset + 12, zlib.crc32(data[body:offset + size]))
    struct.pack_into("<I", data, offset + 16, zlib.crc32(data[offset:offset + 16]))
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("value, dtype", [(float("nan"), torch.float32), (float("inf"), torch.float16),
                                          (float("-inf"), torch.bfloat16)])
def test_a_stored_non_finite_record_is_refused_on_apply(value, dtype, tmp_path):
    """Issue 14: a record holding NaN (checksums intact) opened and was applied, turning the model to NaN.
    Applying it raises ValueError naming the step, before any parameter changes; the other steps apply."""
    path = tmp_path / "s.ulx"
    store = _record(path, keep_ratio=None, value_dtype=dtype)
    _poison(path, store._where[3], value, dtype)
    store = DiskStore(path)
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="step 3 holds NaN or infinity.*nothing was applied"):
        store.apply(model)
    with pytest.raises(ValueError, match="step 3"):
        store.apply(model, [1, 3], max_batch_entries=1)  # also when split into several calls
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    store.apply(model, [0, 1, 2, 4, 5])
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
