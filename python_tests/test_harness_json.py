"""Raw data behind the benchmark tables (issue 27): ``benchmarks/fsdp_topk.py`` and ``benchmarks/bench_record.py``
write their raw figures as JSON beside the page before the page, render the page from that JSON alone (so
``--report JSON`` rewrites it byte for byte, with no training or timing), and refuse a missing, malformed or
foreign ``--report`` file, or an ``--out`` that is not a .md page, with one argparse error naming the option
(exit 2) before anything is written. ``unlearn_ext.machine.git_commit`` names the code that ran (HEAD, and
whether tracked files differed from it)."""
import importlib.util
import json
import os
import shutil
import subprocess
import types

import pytest

from unlearn_ext.machine import describe_commit, git_commit

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: The machine facts every raw record carries (threads, load, versions, build).
MACHINE_KEYS = {"python", "torch", "torch_threads", "cpu_count", "build_info", "Model name"}


def _harness(name: str):
    spec = importlib.util.spec_from_file_location(f"harness_{name}", os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_fsdp_seed(fsdp):
    """``run_seed`` without the two-process training (which takes a minute): rows of the real schema whose
    figures depend on seed, draw, n and r, so the page's means and stds are not all alike."""
    def run_seed(seed, epochs, sizes, draws, tmp):
        rows = []
        for draw in range(draws):
            for n in sizes:
                for i, r in enumerate(fsdp.RATIOS):
                    x = (seed + 1) * 0.001 + draw * 0.0007 + n * 0.0003 + i * 0.0011
                    rows.append({"seed": seed, "draw": draw, "n": n, "r": r, "forget_ids": list(range(n)),
                                 "steps_undone": n, "steps": 22 * epochs, "undone": n / (22 * epochs),
                                 "TA0": 0.98 - seed * 0.001, "TA_dense": 0.9 - x, "TA_shard": 0.97 - x,
                                 "TA_whole": 0.97 - x + (draw == 1) * 0.0022, "FA_shard": 1.0 - x, "FA_whole": 1.0,
                                 "rel": 0.1 + x, "entries_shard": 3016 + i, "entries_whole": 3015 + i})
        return rows
    return run_seed


FSDP_RUN = ["--seeds", "0,1", "--epochs", "1", "--sizes", "2,8", "--draws", "2"]
RECORD_RUN = ["--runs", "mlp:1", "--rounds", "2", "--block-seconds", "0.001", "--storage-steps", "1"]


@pytest.fixture
def fsdp(monkeypatch):
    module = _harness("fsdp_topk")
    monkeypatch.setattr(module, "run_seed", _fake_fsdp_seed(module))
    # only the split sizes are read outside run_seed (and importing scikit-learn takes seconds)
    monkeypatch.setattr(module, "_data", lambda: types.SimpleNamespace(train=range(1348), test=range(449)))
    return module


@pytest.fixture(scope="module")
def record_run(tmp_path_factory):
    """One tiny real run of bench_record.py: its page and raw JSON."""
    out = tmp_path_factory.mktemp("record") / "cpu_record.md"
    assert _harness("bench_record").main(RECORD_RUN + ["--out", str(out)]) == 0
    return out


def _report_elsewhere(module, page, tmp_path):
    """``--report`` on a copy of ``page``'s JSON in another folder: the page it writes there."""
    other = tmp_path / "elsewhere"
    other.mkdir()
    shutil.copy(page.with_suffix(".json"), other / "raw.json")
    assert module.main(["--report", str(other / "raw.json")]) == 0
    assert sorted(os.listdir(other)) == ["raw.json", "raw.md"]
    return other / "raw.md"


def _check_common(doc, page, harness):
    head = (git_commit(ROOT) or {}).get("commit")  # None where the tests run outside a checkout
    assert doc["harness"] == harness
    assert doc["json"] == str(page.with_suffix(".json"))
    assert doc["command"].startswith(f"python {harness} ") and doc["command"].endswith(f" --out {page}")
    assert MACHINE_KEYS <= set(doc["machine"]) and "loadavg" in doc["machine"] and doc["loadavg_end"]
    if head is None:
        assert doc["git"] is None
    else:
        assert doc["git"]["commit"] == head and isinstance(doc["git"]["dirty"], bool)
    assert doc["seconds"] > 0 and doc["finished_utc"]
    text = page.read_text()
    assert doc["command"] in text and doc["finished_utc"] in text and describe_commit(doc["git"]) in text
    assert f"--report {doc['json']}" in text


def test_fsdp_run_writes_raw_rows_and_report_rewrites_its_page(fsdp, tmp_path, capsys):
    page = tmp_path / "fsdp.md"
    assert fsdp.main(FSDP_RUN + ["--out", str(page)]) == 0
    doc = json.loads(page.with_suffix(".json").read_text())
    _check_common(doc, page, "benchmarks/fsdp_topk.py")
    assert doc["args"] == {"seeds": [0, 1], "epochs": 1, "sizes": [2, 8], "draws": 2}
    assert doc["hyper_parameters"]["keep_ratios"] == list(fsdp.RATIOS)
    assert {"lr", "batch", "ranks", "worker_threads"} <= set(doc["hyper_parameters"])
    assert [s["seed"] for s in doc["seeds"]] == [0, 1] and all(s["seconds"] >= 0 for s in doc["seeds"])
    assert len(doc["rows"]) == 2 * 2 * 2 * len(fsdp.RATIOS)
    assert _report_elsewhere(fsdp, page, tmp_path).read_bytes() == page.read_bytes()
    assert capsys.readouterr().out.startswith(page.read_text())  # the printed page is the written one


def test_record_run_writes_raw_figures_and_report_rewrites_its_page(record_run, tmp_path):
    doc = json.loads(record_run.with_suffix(".json").read_text())
    _check_common(doc, record_run, "benchmarks/bench_record.py")
    assert doc["args"]["runs"] == [["mlp", 1]] and doc["args"]["threads"] == 1
    assert doc["machine"]["torch_threads"] == 1
    (o,) = doc["overhead"]
    configs = ["plain", *doc["overhead_configurations"]]
    assert [sorted(order) for order in o["orders"]] == [sorted(configs)] * 2  # every round, each config once
    assert all(len(o[k][c]) == 2 for k in ("wall", "cpu") for c in configs)
    assert {v["met"] for v in o["verdicts"].values()} <= {True, False}
    (st,) = doc["storage"]
    assert [row["target_met"] is None for row in st["rows"]].count(False) == 1  # only r=10% fp16 is judged
    assert _report_elsewhere(_harness("bench_record"), record_run, tmp_path).read_bytes() == record_run.read_bytes()


def test_report_takes_dates_and_verdicts_from_the_json_alone(record_run, tmp_path):
    doc = json.loads(record_run.with_suffix(".json").read_text())
    doc["finished_utc"] = "1999-01-02 03:04"
    for v in doc["overhead"][0]["verdicts"].values():
        v["met"] = False
    raw = tmp_path / "edited.json"
    raw.write_text(json.dumps(doc))
    assert _harness("bench_record").main(["--report", str(raw), "--out", str(tmp_path / "page.md")]) == 0
    text = (tmp_path / "page.md").read_text()
    assert "1999-01-02 03:04 UTC" in text and "| met |" not in text.split("## Storage")[0]


def test_a_failing_page_leaves_the_raw_rows_written(fsdp, tmp_path, monkeypatch):
    def broken(doc):
        raise RuntimeError("page")
    monkeypatch.setattr(fsdp, "report", broken)
    page = tmp_path / "fsdp.md"
    with pytest.raises(RuntimeError):
        fsdp.main(FSDP_RUN + ["--out", str(page)])
    assert len(json.loads(page.with_suffix(".json").read_text())["rows"]) == 32 and not page.exists()


def _bad(tmp_path, name):
    """Report files each harness must refuse: missing, not JSON, the other harness's, an incomplete record."""
    (tmp_path / "broken.json").write_text('{"harness": ')
    (tmp_path / "foreign.json").write_text(json.dumps({"harness": "benchmarks/other.py", "rows": []}))
    (tmp_path / "incomplete.json").write_text(json.dumps({"harness": f"benchmarks/{name}.py"}))
    return ["missing.json", "broken.json", "foreign.json", "incomplete.json"]


@pytest.mark.parametrize("name", ["fsdp_topk", "bench_record"])
def test_bad_report_file_is_one_error_naming_report(name, tmp_path, capsys):
    module = _harness(name)
    for bad in _bad(tmp_path, name):
        with pytest.raises(SystemExit) as e:
            module.main(["--report", str(tmp_path / bad)])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert "error: --report: " in err and str(tmp_path / bad) in err, err
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".md")]


@pytest.mark.parametrize("name, measure", [("fsdp_topk", "run_seed"), ("bench_record", "measure_overhead")])
def test_out_that_is_not_a_page_is_refused_before_running(name, measure, tmp_path, capsys, monkeypatch):
    module = _harness(name)
    monkeypatch.setattr(module, measure, None)  # measuring anything would fail on it
    with pytest.raises(SystemExit) as e:
        module.main(["--out", str(tmp_path / "table.json")])
    assert e.value.code == 2 and "error: --out: " in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def _git(folder, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=folder, check=True,
                   capture_output=True)


def test_git_commit_names_head_and_whether_tracked_files_changed(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    assert git_commit(str(tmp_path)) is None  # not a checkout
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    assert git_commit(str(repo)) is None  # a checkout with no commit has no HEAD to name
    (repo / "a.txt").write_text("one")
    _git(repo, "add", "a.txt")
    _git(repo, "commit", "-q", "-m", "one")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    assert git_commit(str(repo)) == {"commit": head, "dirty": False}
    (repo / "new.txt").write_text("untracked")
    assert git_commit(str(repo)) == {"commit": head, "dirty": False}  # untracked files do not count
    assert describe_commit(git_commit(str(repo))) == f"commit `{head[:12]}`"
    (repo / "a.txt").write_text("two")
    assert git_commit(str(repo)) == {"commit": head, "dirty": True}
    assert describe_commit(git_commit(str(repo))) == f"commit `{head[:12]}` with uncommitted changes"
    assert describe_commit(None) == "not in a git checkout"
