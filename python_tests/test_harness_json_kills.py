"""``benchmarks/request_kill_injection.py`` keeps its raw trials (issue 27): a run writes them as JSON beside
the page before the page, the page is rendered from that JSON alone (``--report`` rewrites it byte for byte),
a broken promise is on the page and in the exit code, and a file that is not its raw record is refused with one
argparse error naming ``--report``, nothing written. The trials themselves (forked ``forget`` runs killed at
random) are test_deletion_kills.py's; here they are stand-ins of the same schema."""
import json
import types

import pytest

from benchmarks import request_kill_injection as kills


def _trial(scenario, workdir, index, point, rng):
    if point == "request-after-log" and index == 2:  # one broken promise, to see it reported
        raise AssertionError(f"request {index}: the log holds the entry twice")
    return {"request": "ABCD"[index], "point": point or "random", "killed": rng.random() < 0.8,
            "logged_before_rerun": point in ("request-after-log", "log-entry:-1")}


@pytest.fixture
def run(monkeypatch, tmp_path):
    monkeypatch.setattr(kills, "make_scenario", lambda folder: types.SimpleNamespace(seconds=0.25))
    monkeypatch.setattr(kills, "kill_trial", _trial)
    page = tmp_path / "kills.md"
    assert kills.main(["--random-kills", "5", "--out", str(page)]) == 1  # the broken promise fails the run
    return page


def test_run_writes_every_trial_then_the_page_from_them(run, tmp_path):
    raw = json.loads(run.with_suffix(".json").read_text())
    assert raw["harness"] == kills.HARNESS and raw["args"] == {"random_kills": 5, "seed": 0}
    assert len(raw["trials"]) == 4 * len(kills.NAMED_POINTS) + 5 and len(raw["failures"]) == 1
    assert {"torch_threads", "loadavg"} <= set(raw["machine"]) and raw["loadavg_end"] and raw["git"]
    text = run.read_text()
    assert "**Broken promises: 1**" in text and "- FAIL request 2: the log holds the entry twice" in text
    assert kills.main(["--report", str(run.with_suffix(".json")), "--out", str(tmp_path / "again.md")]) == 0
    assert (tmp_path / "again.md").read_bytes() == run.read_bytes()


@pytest.mark.parametrize("content", [None, "{", '{"harness": "benchmarks/fsdp_topk.py"}',
                                     '{"harness": "benchmarks/request_kill_injection.py"}'],
                         ids=("missing", "not-json", "other-harness", "incomplete"))
def test_report_refuses_what_is_not_its_raw_record(tmp_path, capsys, content):
    path = tmp_path / "raw.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as stop:
        kills.main(["--report", str(path)])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--report:" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if content is None else ["raw.json"])
