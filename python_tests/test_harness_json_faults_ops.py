"""Raw data behind two more results pages (issue 27): ``benchmarks/store_fault_injection.py`` (store_faults.md)
and the kernel benchmark ``unlearn_ext/bench.py`` (cpu_ops.md; also ``benchmarks/bench_ops.py`` and
``unlearn-ext bench``) write every trial or row as measured, the arguments used, machine facts, load before and
after and the git commit as JSON beside the page, render the page from that JSON alone (so ``--report JSON``
rewrites it byte for byte, measuring nothing), and refuse a missing, malformed, foreign or incomplete
``--report`` file, or a page named .json, with one argparse error naming the option (exit 2), writing nothing."""
import contextlib
import importlib.util
import json
import os
import shutil
import statistics
import subprocess

import pytest
import torch

from unlearn_ext import bench

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: The machine facts every raw record carries (threads, load, versions, build).
MACHINE_KEYS = {"python", "torch", "torch_threads", "cpu_count", "build_info", "Model name", "loadavg"}
FAULTS_RUN = ["--kills", "2", "--corruptions", "2", "--disk-full", "2", "--seed", "3"]
BENCH_RUN = ["--quick", "--device", "cpu", "--models", "tensor4096", "--reps", "2"]
BENCH_PROG = "unlearn-ext bench"


@contextlib.contextmanager
def _one_thread():
    """One intra-op thread for a module-scoped run (the function-scoped ``one_thread`` starts after it)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _faults_harness():
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(ROOT)  # it imports the trials from the package python_tests
        spec = importlib.util.spec_from_file_location(
            "harness_store_fault_injection", os.path.join(ROOT, "benchmarks", "store_fault_injection.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def faults():
    """The harness with one golden configuration (the smallest) instead of four: the trials are the same."""
    module = _faults_harness()
    module.CONFIGS = {"r1-fp32": module.CONFIGS["r1-fp32"]}
    return module


@pytest.fixture(scope="module")
def faults_page(faults, tmp_path_factory):
    """One tiny real run: its page (the raw JSON beside it) and what it printed."""
    page = tmp_path_factory.mktemp("faults") / "store_faults.md"
    with _one_thread():
        assert faults.main(FAULTS_RUN + ["--out", str(page)]) == 0
    return page


@pytest.fixture(scope="module")
def bench_page(tmp_path_factory):
    page = tmp_path_factory.mktemp("bench") / "cpu_ops.md"
    with _one_thread():
        assert bench.main(BENCH_RUN + ["--markdown", str(page)], prog=BENCH_PROG) == 0
    return page


def _head() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def _check_common(doc, page, harness, command):
    assert doc["harness"] == harness and doc["command"] == command
    assert doc["json"] == str(page.with_suffix(".json"))
    assert MACHINE_KEYS <= set(doc["machine"]) and doc["machine"]["torch_threads"] == 1 and doc["loadavg_end"]
    assert doc["git"] == {"commit": _head(), "dirty": doc["git"]["dirty"]} and isinstance(doc["git"]["dirty"], bool)
    assert doc["seconds"] > 0 and doc["started_utc"] <= doc["finished_utc"]
    text = page.read_text()
    for fact in (doc["command"], doc["finished_utc"], _head()[:12], f"--report {doc['json']}",
                 doc["machine"]["loadavg"], doc["loadavg_end"]):
        assert fact in text, fact


def _report_elsewhere(main, page, tmp_path):
    """``--report`` on a copy of ``page``'s JSON in another folder: the page it writes beside the copy."""
    other = tmp_path / "elsewhere"
    other.mkdir()
    shutil.copy(page.with_suffix(".json"), other / "raw.json")
    assert main(["--report", str(other / "raw.json")]) == 0
    assert sorted(os.listdir(other)) == ["raw.json", "raw.md"]
    return other / "raw.md"


def test_fault_run_writes_every_trial_and_report_rewrites_its_page(faults, faults_page, tmp_path, capsys):
    doc = json.loads(faults_page.with_suffix(".json").read_text())
    _check_common(doc, faults_page, "benchmarks/store_fault_injection.py",
                  f"python -m benchmarks.store_fault_injection {' '.join(FAULTS_RUN)} --out {faults_page}")
    assert doc["args"] == {"kills": 2, "corruptions": 2, "disk_full": 2, "seed": 3}
    assert list(doc["goldens"]) == ["r1-fp32"] and doc["goldens"]["r1-fp32"]["bytes"] > 0
    assert doc["failures"] == []
    assert [(k["trial"], k["mode"]) for k in doc["kills"]] == [(0, "time"), (1, "byte")]
    assert all({"phase", "kept", "lost", "killed", "flush_every", "max_pending"} <= set(k) for k in doc["kills"])
    assert [c["trial"] for c in doc["corruptions"]] == [0, 1] and all("kind" in c for c in doc["corruptions"])
    # the second disk-full trial fills a tmpfs where this user may mount one; its mount must not outlive it
    assert [f["how"] for f in doc["disk_full"]] == (doc["disk_full_ways"] * 2)[:2]
    assert _report_elsewhere(faults.main, faults_page, tmp_path).read_bytes() == faults_page.read_bytes()
    assert capsys.readouterr().out == faults_page.read_text() + "\n"  # --report prints the page it wrote


def test_fault_page_takes_dates_and_failures_from_the_json_alone(faults, faults_page, tmp_path, capsys):
    doc = json.loads(faults_page.with_suffix(".json").read_text())
    doc["finished_utc"] = "1999-01-02 03:04"
    doc["failures"] = [{"group": "kill", "trial": 7, "what": "kill trial 7 (time, r1-fp32)", "error": "lost 9"}]
    (tmp_path / "edited.json").write_text(json.dumps(doc))
    assert faults.main(["--report", str(tmp_path / "edited.json"), "--out", str(tmp_path / "page.md")]) == 0
    text = (tmp_path / "page.md").read_text()
    assert "on 1999-01-02 03:04 UTC" in text and "- FAIL kill trial 7 (time, r1-fp32): lost 9" in text
    assert "**Failures (a broken promise): 1** of 7 trials." in text


def test_bench_run_writes_every_round_and_report_rewrites_its_page(bench_page, tmp_path):
    doc = json.loads(bench_page.with_suffix(".json").read_text())
    _check_common(doc, bench_page, "unlearn_ext.bench", f"{BENCH_PROG} {' '.join(BENCH_RUN)} --markdown {bench_page}")
    assert doc["args"] == {"device": "cpu", "quick": True, "reps": 2, "warmup": bench.WARMUP, "ratios": [0.1],
                           "models": {"cpu": ["tensor4096"]}}
    ops = [r["op"].strip() for r in doc["rows"]]
    assert ops[0] == "layerwise_topk" and "masked_adam_ (masks given)" in ops and len(ops) == 8
    for r in doc["rows"]:  # each median from the rounds it names
        assert all(len(ts) == 2 for ts in r["rounds_ms"].values())
        assert r["ours_ms"] == pytest.approx(statistics.median(r["rounds_ms"][r["timed"]["ours"]]))
        if r["base_ms"] is not None:
            assert r["base_ms"] == pytest.approx(statistics.median(r["rounds_ms"][r["timed"]["base"]]))
    assert [r["timed"] for r in doc["rows"] if "sgd" in r["op"].lower()] == [
        {"ours": "ours", "base": "base"}, {"ours": "plain", "base": None}, {"ours": "ours_sel", "base": "base_sel"}]
    assert doc["targets"] == []  # the targets are stated for the ResNet shapes only
    main = lambda argv: bench.main(argv, prog=BENCH_PROG)  # noqa: E731
    assert _report_elsewhere(main, bench_page, tmp_path).read_bytes() == bench_page.read_bytes()


def test_bench_page_takes_dates_and_targets_from_the_json_alone(bench_page, tmp_path):
    doc = json.loads(bench_page.with_suffix(".json").read_text())
    doc["finished_utc"] = "1999-01-02 03:04"
    doc["targets"] = ["[cpu] layerwise_topk, resnet18, r=10%: 0.50x the loop (target >= 3x): MISSED"]
    (tmp_path / "edited.json").write_text(json.dumps(doc))
    page = tmp_path / "page.md"
    assert bench.main(["--report", str(tmp_path / "edited.json"), "--markdown", str(page)], prog=BENCH_PROG) == 0
    text = page.read_text()
    assert "Measured 1999-01-02 03:04 UTC" in text and text.endswith(f"\n- {doc['targets'][0]}\n")


def _bad(tmp_path, harness):
    """Report files a harness must refuse: missing, not JSON, another harness's, an incomplete record."""
    (tmp_path / "broken.json").write_text('{"harness": ')
    (tmp_path / "foreign.json").write_text(json.dumps({"harness": "benchmarks/other.py", "rows": []}))
    (tmp_path / "incomplete.json").write_text(json.dumps({"harness": harness}))
    return ["missing.json", "broken.json", "foreign.json", "incomplete.json"]


@pytest.mark.parametrize("which", ["faults", "bench"])
def test_bad_report_file_is_one_error_naming_report(which, faults, tmp_path, capsys):
    main, harness = ((faults.main, faults.HARNESS) if which == "faults"
                     else (lambda argv: bench.main(argv, prog=BENCH_PROG), bench.HARNESS))
    for bad in _bad(tmp_path, harness):
        with pytest.raises(SystemExit) as e:
            main(["--report", str(tmp_path / bad)])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[0].startswith("usage:") and "Traceback" not in "\n".join(err)
        assert "error: --report: " in err[-1] and str(tmp_path / bad) in err[-1], err
    assert sorted(os.listdir(tmp_path)) == ["broken.json", "foreign.json", "incomplete.json"]


@pytest.mark.parametrize("which", ["faults", "bench"])
def test_a_page_named_json_is_refused_before_measuring(which, faults, tmp_path, capsys, monkeypatch):
    if which == "faults":
        monkeypatch.setattr(faults, "run_trials", None)  # running a trial would fail on it
        main, option = faults.main, "--out"
    else:
        monkeypatch.setattr(bench, "bench_model", None)
        main, option = (lambda argv: bench.main(argv, prog=BENCH_PROG)), "--markdown"
    with pytest.raises(SystemExit) as e:
        main([option, str(tmp_path / "page.json")])
    assert e.value.code == 2 and f"error: {option}: " in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
