"""A seed reproduces across entry points: `unlearn-ext demo` is seed 0 of
`benchmarks/reproduce_paper.py --setting demo` (same thread count), row by row, by the SHA-256 of the final
weights — whichever other methods ran beside it. And the harness's markdown is a function of its JSON:
`--report` rebuilds it byte for byte; a file that is not its JSON is refused in one line."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: The demo's setting made small: 600 of scikit-learn's digits, one epoch (75 steps of batch 8), 10 forgotten;
#: one thread, as the committed table ran (results depend on the thread count).
SMALL = ["--train-size", "600", "--epochs", "1", "--threads", "1"]


def _run(args, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seeds")
    demo = _run(["-m", "unlearn_ext.cli", "demo", "--dataset", "digits", *SMALL, "--methods", "retrain,finetune,partial_amnesiac",
                 "--no-progress", "--out", str(tmp / "demo")])
    assert demo.returncode == 0, demo.stderr[-2000:]
    table = _run(["benchmarks/reproduce_paper.py", "--setting", "demo", "--datasets", "digits", *SMALL, "--seeds", "0",
                  "--methods", "retrain,ga,finetune,partial_amnesiac", "--out", str(tmp / "table.md")])
    assert table.returncode == 0, table.stderr[-2000:]
    return (json.loads((tmp / "demo" / "results.json").read_text()), json.loads((tmp / "table.json").read_text()),
            tmp)


def test_demo_is_seed_0_of_the_demo_setting_table(both):
    demo, table, _ = both
    (pair,) = table["pairs"]
    (seed0,) = pair["runs"]
    assert seed0["config"]["seed"] == 0 and demo["config"]["seed"] == 0
    assert seed0["environment"]["torch_threads"] == demo["environment"]["torch_threads"] == 1
    for row in ("original", "retrain", "finetune", "partial_amnesiac"):
        assert demo["rows"][row]["weights_sha256"] == seed0["rows"][row]["weights_sha256"], row
        assert demo["rows"][row]["FA"] == seed0["rows"][row]["FA"], row
    assert "ga" in seed0["rows"] and "ga" not in demo["rows"]  # another method beside it changed nothing
    same_config = {k: v for k, v in demo["config"].items() if k not in ("methods", "store_dir", "keep_stores")}
    assert same_config == {k: seed0["config"][k] for k in same_config}


def test_a_calibrated_row_counts_every_try(both):
    _, table, _ = both
    for row in table["pairs"][0]["runs"][0]["rows"].values():
        cal = row.get("calibration")
        if cal is None:
            continue
        assert row["seconds"] == pytest.approx(sum(t["seconds"] for t in cal["tries"]))
        assert row["steps_all_tries"] == sum(t["steps"] for t in cal["tries"])
        assert row["seconds_kept_try"] == cal["tries"][cal["chosen"]]["seconds"]
        assert row["rte"] == pytest.approx(row["rte_kept_try"] * row["seconds_kept_try"] / row["seconds"])


def test_seeds_run_in_separate_processes_join_into_the_same_runs(both):
    _, table, tmp = both
    other = _run(["benchmarks/reproduce_paper.py", "--setting", "demo", "--datasets", "digits", *SMALL, "--seeds", "1",
                  "--methods", "retrain,ga,finetune,partial_amnesiac", "--out", str(tmp / "seed1.md")])
    assert other.returncode == 0, other.stderr[-2000:]
    joined = _run(["benchmarks/reproduce_paper.py", "--report", f"{tmp / 'table.json'},{tmp / 'seed1.json'}",
                   "--out", str(tmp / "joined.md")])
    assert joined.returncode == 0, joined.stderr
    (pair,) = json.loads((tmp / "joined.json").read_text())["pairs"]
    assert [r["config"]["seed"] for r in pair["runs"]] == [0, 1]
    assert pair["runs"][0] == table["pairs"][0]["runs"][0]
    assert "Joined from 2 processes" in (tmp / "joined.md").read_text()
    twice = _run(["benchmarks/reproduce_paper.py", "--report", f"{tmp / 'seed1.json'},{tmp / 'seed1.json'}",
                  "--out", str(tmp / "twice.md")])
    assert twice.returncode == 2 and "--report:" in twice.stderr and "more than one file" in twice.stderr


def test_report_rebuilds_the_markdown_from_the_json(both):
    _, _, tmp = both
    again = _run(["benchmarks/reproduce_paper.py", "--report", str(tmp / "table.json"), "--out", str(tmp / "again.md")])
    assert again.returncode == 0, again.stderr
    assert (tmp / "again.md").read_bytes() == (tmp / "table.md").read_bytes()


@pytest.mark.parametrize("content", [None, "not json", '{"pairs": 3}'], ids=("missing", "not-json", "wrong-shape"))
def test_report_refuses_what_is_not_its_json_in_one_line(tmp_path, content):
    path = tmp_path / "x.json"
    if content is not None:
        path.write_text(content)
    got = _run(["benchmarks/reproduce_paper.py", "--report", str(path), "--out", str(tmp_path / "x.md")])
    assert got.returncode == 2
    assert "--report:" in got.stderr and "Traceback" not in got.stderr
    assert not (tmp_path / "x.md").exists()
