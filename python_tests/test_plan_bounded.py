"""The storage planner in bounded memory (issue 30): a model larger than memory and a batch of billions of
samples are planned from counts, never allocated; what no recording could ever hold or use is refused with
one line, before any work starts."""
import json
import resource
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

warnings.filterwarnings("ignore", message="unlearn_ext: compiled kernels not loaded")

from unlearn_ext import cli, plan  # noqa: E402
from unlearn_ext.record import UpdateRecorder  # noqa: E402
from unlearn_ext.record.identity import Manifest  # noqa: E402
from unlearn_ext.record.planner import MAX_BATCH_SIZE, MAX_STEPS, plan_storage  # noqa: E402

WIDE = 2**15
MEMORY_LIMIT = 4 << 30
BIG_BATCH = 2**32 - 1  # the most ids a record can hold: 32 GiB of int64 ids if they were allocated
STEPS, RATIO, FRACTION = 3910, 0.01, 1e-9


# 3.2e9 trainable entries (three 2**30-entry layers: 12 GiB of float32), and small layers that take every
# encoding at RATIO: INDEX (the wide layers), BITMASK (10 entries, 1 kept) and FULL (1 entry)
LINEARS = [(WIDE, WIDE)] * 3 + [(WIDE, 10), (10, 1)]


def _big_model() -> nn.Module:
    with torch.device("meta"):
        return nn.Sequential(*(nn.Linear(a, b) for a, b in LINEARS))


def _expected_record_bytes(numels, batch_size, kept, value_itemsize) -> int:
    """One record's bytes written out from the format (disk_format's module docstring and encoding's
    table): a 20-byte frame header, step, id count and layer count (16 bytes), a kind byte per layer padded
    to 8, an int64 count per layer, an int64 per id, then each layer's values and structure."""
    layers = len(numels)
    total = 20 + 16 + (layers + 7) // 8 * 8 + 8 * layers + 8 * batch_size
    for n, k in zip(numels, kept):
        mask = (n + 7) // 8
        structure = 0 if k in (0, n) else 4 * k if 4 * k <= mask else mask
        total += k * value_itemsize + structure
    return total


def _expected_file_bytes(manifest: Manifest) -> int:
    """A closed file beside its records: 20-byte header, the manifest's JSON, 16-byte trailer."""
    return 20 + len(manifest.to_json()) + 16


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


_PLAN_IN_A_SMALL_PROCESS = f"""
import json, warnings
warnings.filterwarnings("ignore", message="unlearn_ext: compiled kernels not loaded")
import torch
from torch import nn
from unlearn_ext.record.planner import plan_storage
with torch.device("meta"):
    model = nn.Sequential(*(nn.Linear(a, b) for a, b in {LINEARS}))
plan = plan_storage(model, {STEPS}, {BIG_BATCH}, {RATIO}, torch.float16, {FRACTION})
print(json.dumps([plan.params, plan.dense_update_nbytes,
                  [[r.recording, r.bytes_per_step, r.recorded_steps, r.total_bytes] for r in plan.rows]]))
"""


def test_a_model_larger_than_memory_plans_in_bounded_memory():
    """3.2e9 entries and a batch of 2**32 - 1 samples, in a process limited to 4 GiB of address space:
    the plan is computed from the layers' and the batch's sizes, and its figures are the format's."""
    proc = subprocess.run([sys.executable, "-c", _PLAN_IN_A_SMALL_PROCESS], preexec_fn=_limit_memory,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    params, dense_update, rows = json.loads(proc.stdout)
    model = _big_model()
    numels = [p.numel() for p in model.parameters()]
    assert params == sum(numels) > 2**31 and dense_update == 4 * sum(numels)
    kept = [min(n, max(1, -(-n // 100))) for n in numels]  # ceil(n/100) entries, at least one
    assert [n for n, k in zip(numels, kept) if k not in (0, n) and 4 * k <= (n + 7) // 8] == numels[:7]  # INDEX
    dense = _expected_record_bytes(numels, BIG_BATCH, numels, 2)
    partial = _expected_record_bytes(numels, BIG_BATCH, kept, 2)
    dense_file = _expected_file_bytes(Manifest.from_model(model, None, torch.float16))
    partial_file = _expected_file_bytes(Manifest.from_model(model, RATIO, torch.float16))
    recorded = round(STEPS * (1 - (1 - FRACTION) ** BIG_BATCH))
    assert 0 < recorded < STEPS
    assert rows == [["dense", dense, STEPS, dense_file + STEPS * dense],
                    [f"partial r={RATIO:g}", partial, STEPS, partial_file + STEPS * partial],
                    [f"dense, only ids f={FRACTION:g}", dense, recorded, dense_file + recorded * dense],
                    [f"partial r={RATIO:g}, only ids f={FRACTION:g}", partial, recorded,
                     partial_file + recorded * partial]]


def test_what_the_record_format_cannot_hold_is_refused():
    """A record stores its id count as uint32 and its step as int64: larger batches or step counts could
    never be recorded (the largest batch is planned in test_a_model_larger_than_memory_plans_in_bounded_memory)."""
    with torch.device("meta"):
        model = nn.Linear(2, 2)
    assert MAX_BATCH_SIZE == BIG_BATCH and MAX_STEPS == 2**63
    assert plan_storage(model, MAX_STEPS, 1).row("dense").recorded_steps == MAX_STEPS
    for kw, message in [({"batch_size": 10**11}, "batch_size must be an integer >= 1 and <= 4294967295"),
                        ({"steps": MAX_STEPS + 1}, "steps must be an integer >= 1 and <= 2\\*\\*63")]:
        with pytest.raises(ValueError, match=message):
            plan_storage(model, **{"steps": 3, "batch_size": 4, **kw})


def test_only_ids_never_records_more_steps_than_there_are():
    """The expected count is rounded from a float: at 2**63 steps it must not round above the steps."""
    with torch.device("meta"):
        model = nn.Linear(2, 2)
    row = plan_storage(model, MAX_STEPS - 1, 128, only_fraction=1.0).row("dense, only ids f=1")
    assert row.recorded_steps == MAX_STEPS - 1


def test_a_float64_model_is_refused_as_the_recorder_refuses_it():
    """A float64 recording could never be applied: the plan refuses it with the recorder's own error."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).to(torch.float64)
    for ratio in (None, 0.1):
        with pytest.raises(ValueError, match="parameter '0.weight' has dtype torch.float64") as refused:
            plan_storage(model, 10, 4, ratio)
        with pytest.raises(ValueError) as recorder_refused:
            UpdateRecorder(model, ratio)
        assert str(refused.value) == str(recorder_refused.value)


def _cli_error(capsys, args) -> str:
    """The one error line of a refused `unlearn-ext plan` (exit status 2, no traceback)."""
    with pytest.raises(SystemExit) as e:
        cli.main(["plan", *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert lines[0].startswith("usage:") and lines[-1].startswith("unlearn-ext plan: error: ")
    assert not any(line.startswith("unlearn-ext plan") for line in lines[1:-1]), err
    return lines[-1]


@pytest.mark.parametrize("args, message", [
    (["--model", "mlp", "--batch-size", "100000000000"], "batch_size must be an integer >= 1 and <= 4294967295"),
    (["--model", "mlp", "--steps", "10" * 16], "steps must be an integer >= 1 and <= 2**63"),
    (["--model", "mlp", "--input-shape", "1,100000,100000"],
     "parameter '1.weight' has 5120000000000 elements; at most 2**31 - 1 are supported"),
    (["--model", "lenet", "--input-shape", "3,100000,100000"],
     "parameter 'classifier.1.weight' has 1200000000000 elements; at most 2**31 - 1 are supported"),
    (["--model", "mlp", "--input-shape", "1,1000000000000000000000,1"], "--input-shape/--num-classes: "),
    (["--model", "lenet", "--input-shape", "3,1000000000000,1000000000000"], "--input-shape/--num-classes: "),
    (["--model", "simplevit", "--input-shape", "3,1000000000000,1000000000000"], "--input-shape/--num-classes: "),
    (["--model", "mlp", "--num-classes", "100000000000000000000000"], "--input-shape/--num-classes: "),
    (["--model", "mlp", "--num-classes", "1"], "num_classes must be >= 2"),
    (["--model", "mlp", "--input-shape", "1,x,28"], "--input-shape: expected C,H,W integers"),
    (["--model", "mlp", "--input-shape", "0,28,28"], "input_shape must be (C, H, W) with positive sizes"),
    (["--model", "mlp", "--keep-ratio", "nan"], "keep_ratio must be in (0, 1]"),
    (["--model", "mlp", "--only-fraction", "inf"], "only_fraction must be in (0, 1]"),
    (["--model", "mlp", "--steps", "1e5"], "argument --steps: invalid int value"),
])
def test_plan_refuses_huge_and_malformed_arguments_with_one_line(capsys, args, message):
    line = _cli_error(capsys, [*args, "--steps", "10"] if "--steps" not in args else args)
    assert message in line


def test_plan_checks_every_argument_before_building_the_model(capsys, tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the arguments were checked")

    monkeypatch.setattr(plan, "make_model", no_model)
    for args, message in [(["--store-dir", str(tmp_path / "missing")], "--store-dir: cannot read the free space"),
                          (["--steps", "0"], "steps must be an integer >= 1"),
                          (["--batch-size", str(10**11)], "batch_size must be"),
                          (["--keep-ratio", "2"], "keep_ratio must be in"),
                          (["--only-fraction", "0"], "only_fraction must be in")]:
        line = _cli_error(capsys, ["--model", "mlp", "--steps", "10", *args])
        assert message in line
