"""docs/usage.md's "Recording in your training loop" runs as written (issue 18): each snippet is executed with a
small convolutional model, its optimizer and a loader of (x, y, ids) batches, and what it recorded is
checked. The FSDP2 snippet runs in test_record_fsdp.py's two processes; `torch.compile` runs with the eager
backend here (the same wrapper and parameter names, without inductor's minutes of C++ compilation)."""
import functools
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

warnings.filterwarnings("ignore", message="unlearn_ext: compiled kernels not loaded")

from readme_snippets import loop_snippets, plan_command, plan_printed  # noqa: E402
from unlearn_ext import cli  # noqa: E402
from unlearn_ext.record import DiskStore  # noqa: E402
from unlearn_ext.record.planner import plan_storage  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _loop(tmp_path, monkeypatch, n_batches=8, poisoned=None):
    """The names the snippets take from "your own loop", in the folder where their stores go."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    g = torch.Generator().manual_seed(1)
    loader = []
    for b in range(n_batches):
        x = torch.randn(4, 2, 8, 8, generator=g)
        if b == poisoned:
            x[0, 0, 0, 0] = float("inf")
        loader.append((x, torch.randint(0, 3, (4,), generator=g), torch.arange(4 * b, 4 * b + 4)))
    return {"model": model, "opt": torch.optim.SGD(model.parameters(), lr=0.05), "loader": loader,
            "loss_fn": F.cross_entropy, "device": "cpu", "forget_ids": torch.tensor([5])}


def test_the_snippets_are_the_section_s_cases():
    assert list(loop_snippets()) == ["gradient accumulation", "mixed precision",
                                     "compiled model, channels_last, LR schedule", "FSDP2", "storage plan"]


def test_gradient_accumulation_snippet(tmp_path, monkeypatch):
    ns = _loop(tmp_path, monkeypatch)
    exec(loop_snippets()["gradient accumulation"], ns)
    store = ns["rec"].store
    assert store.steps() == [0, 1]
    assert store.sample_ids(1).tolist() == list(range(16, 32))  # the ids of its 4 micro-batches


def test_mixed_precision_snippet(tmp_path, monkeypatch):
    ns = _loop(tmp_path, monkeypatch, poisoned=2)
    exec(loop_snippets()["mixed precision"], ns)
    rec = ns["rec"]
    assert rec.skipped_steps == 1 and rec.store.steps() == list(range(7))
    assert rec.store.steps_containing(torch.arange(8, 12)) == []  # the skipped batch's ids went nowhere
    assert set(rec.manifest.dtypes) == {"float32"}


def test_compiled_model_snippet(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    ns = _loop(tmp_path, monkeypatch)
    trained = []
    apply = DiskStore.apply

    def spy(store, model, *args, **kw):  # keeps the trained weights the snippet's removal starts from
        trained.extend(p.detach().clone() for p in model.parameters())
        return apply(store, model, *args, **kw)

    monkeypatch.setattr(DiskStore, "apply", spy)
    exec(loop_snippets()["compiled model, channels_last, LR schedule"], ns)
    store = ns["store"]
    assert store.manifest.names[0] == "0.weight" and store.steps() == list(range(8))
    assert store.steps_containing(ns["forget_ids"]) == [1]
    assert not ns["model"][0].weight.is_contiguous()  # channels_last, and the step was removed from it
    assert not torch.equal(ns["model"][0].weight, trained[0])


def test_storage_plan_snippet_and_command(tmp_path, monkeypatch, capsys):
    ns = _loop(tmp_path, monkeypatch)
    exec(loop_snippets()["storage plan"], ns)
    plan = plan_storage(ns["model"], 80, 128, keep_ratio=0.1, value_dtype=torch.float16)
    assert ns["store"].expected_nbytes == plan.row("partial r=0.1").total_bytes
    assert "partial r=0.1" in capsys.readouterr().out
    args = plan_command()
    assert cli.main(args) == 0
    assert _plan_figures(capsys.readouterr().out) == _plan_figures(plan_printed())


def _plan_figures(printed):
    """The numbers of each line a plan prints, but the free-space line's (that machine's disk)."""
    return [re.findall(r"\d[\d,]*(?:\.\d+)?", line) for line in printed.splitlines()
            if line.strip() and not line.startswith("free space at")]
