"""The exact tier (issue 25): checkpoints hold all a replay needs; `forget --exact` is bitwise `train --exclude-ids`
with every id forgotten so far (two models, a schedule, weight decay, SGD and Adam, with and without checkpoints
between the affected steps); later amnesiac requests undo the replayed trajectory; the router's choice and its
cost estimate are in every receipt; `--dry-run` writes nothing; retries and a killed replay leave one answer."""
import contextlib
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message="unlearn_ext: compiled kernels not loaded")

from unlearn_ext import data  # noqa: E402
from unlearn_ext.deletion import RequestLog, state_digest  # noqa: E402
from unlearn_ext.deletion.commands import forget_main, train_main  # noqa: E402
from unlearn_ext.deletion import exact  # noqa: E402
from unlearn_ext.deletion.replay import Checkpoints, batch_plan  # noqa: E402
from unlearn_ext.record import DiskStore  # noqa: E402
from request_kills import run_child  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["--dataset", "digits", "--train-size", "240", "--epochs", "2", "--batch-size", "16", "--seed", "5",
         "--no-progress"]
#: (model, optimizer flags): two models; Adam with a cosine schedule and weight decay; SGD with weight decay.
RECIPES = {"mlp-adam-cosine-wd": ["--model", "mlp", "--lr-schedule", "cosine", "--weight-decay", "0.01"],
           "lenet-sgd-wd": ["--model", "lenet", "--optimizer", "sgd", "--lr", "0.05", "--weight-decay", "0.001"]}


def _train(folder, recipe, *extra):
    folder.mkdir(exist_ok=True)
    args = SMALL + RECIPES[recipe] + ["--store", str(folder / "run.ulx"), "--out", str(folder / "model.pt"), *extra]
    assert train_main(args) == 0
    return folder


def _ids(folder, name, ids):
    path = folder / name
    path.write_text("".join(f"{i}\n" for i in ids))
    return str(path)


def _forget(folder, ids, checkpoint, out, *extra):
    return forget_main(["--store", str(folder / "run.ulx"), "--checkpoint", str(folder / checkpoint),
                        "--ids", _ids(folder, out + ".ids", ids), "--out", str(folder / out), *extra])


def _digest(path):
    return state_digest(torch.load(path, weights_only=True))


def _without(tmp_path, recipe, ids):
    """The digest of `train --exclude-ids` with ``ids``, from scratch."""
    folder = tmp_path / f"scratch-{recipe}-{len(ids)}-{ids[0]}"
    folder.mkdir()
    _train(folder, recipe, "--exclude-ids", _ids(folder, "x.txt", ids))
    return _digest(folder / "model.pt")


def _first_steps(folder):
    """Each sample id's first recorded step in the run at ``folder``."""
    store = DiskStore(folder / "run.ulx")
    first = {}
    for step in store.steps():
        for i in store.sample_ids(step).tolist():
            first.setdefault(i, step)
    return first


@pytest.fixture(scope="module", params=sorted(RECIPES))
def trained(request, tmp_path_factory):
    recipe = request.param
    return recipe, _train(tmp_path_factory.mktemp(recipe), recipe, "--checkpoint-every", "4")


@pytest.fixture
def run(trained, tmp_path):
    recipe, folder = trained
    shutil.copytree(folder, tmp_path / "run")
    return recipe, tmp_path / "run"


def test_every_checkpoint_replays_the_run_bitwise(trained):
    """Replaying from each checkpoint with nothing forgotten gives the trained model and the same records: the
    checkpoint (model, optimizer, RNG) and the plan are all the rest of the run depends on."""
    recipe, folder = trained
    log = RequestLog(folder / "run.ulx.requests", DiskStore(folder / "run.ulx"))
    header = log.header()
    current = exact.Generations(log.path, log.stores).current(header, [])
    assert current.checkpoints.steps() == list(range(0, 30, 4))
    train_set = exact.training_set(header["recipe"], None, None)
    trained_digest = _digest(folder / "model.pt")
    for start in (0, 12, 28):
        got = exact.replay(log.path, header, current, [], start, train_set)
        assert state_digest(got["state"]) == trained_digest, (recipe, start)
        replayed, recorded = got["store"], log.stores[0]
        assert replayed.steps() == recorded.steps() and got["facts"]["copied_records"] == start
        for a, b in zip(replayed.records(), recorded.records()):
            assert a.step == b.step and torch.equal(a.values, b.values) and torch.equal(a.indices, b.indices)
        shutil.rmtree(exact.generation_folder(log.path, header, 1))


def test_exact_requests_equal_training_without_every_forgotten_id(run, tmp_path):
    """Amnesiac A, exact B (replay from a checkpoint before A's first step), amnesiac C on the replayed
    trajectory, exact D: each exact output is bitwise `train --exclude-ids` with every id forgotten so far."""
    recipe, folder = run
    first = _first_steps(folder)
    late = sorted((i for i in first if first[i] >= 14), key=first.get)
    a, b, c, d = [late[0]], [late[1]], [late[2]], [min(first, key=first.get)]  # d: in step 0's batch
    assert _forget(folder, a, "model.pt", "m1.pt", "--tier", "amnesiac", "--max-undone", "1") == 0
    assert _forget(folder, b, "m1.pt", "m2.pt", "--exact") == 0
    assert _digest(folder / "m2.pt") == _without(tmp_path, recipe, sorted(a + b))
    assert _forget(folder, c, "m2.pt", "m3.pt", "--tier", "amnesiac", "--max-undone", "1") == 0
    assert _forget(folder, d, "m3.pt", "m4.pt", "--exact") == 0
    assert _digest(folder / "m4.pt") == _without(tmp_path, recipe, sorted(a + b + c + d))
    log = RequestLog(folder / "run.ulx.requests", DiskStore(folder / "run.ulx"))
    r = log.receipts()
    assert [x.tier for x in r] == ["amnesiac", "exact", "amnesiac", "exact"]
    assert r[1].replay["replay_from"] == 4 * (min(first[a[0]], first[b[0]]) // 4) and r[3].replay["replay_from"] == 0
    assert r[2].undone_steps == len(r[2].steps_new) and r[2].recorded_steps == r[1].recorded_steps  # a fresh count
    assert all(x.route and x.route["exact"] is not None for x in r)  # the cost estimate in every receipt
    assert log.current_store().path.endswith(os.path.join("gen-0002", "store.ulx"))
    store = log.current_store()
    assert not store.steps_containing(a + b + c + d)  # the replayed trajectory never saw a forgotten id


def test_without_checkpoints_between_the_affected_steps(tmp_path):
    """K larger than the run: the only checkpoint is step 0's, so the replay is a whole retraining."""
    recipe = "mlp-adam-cosine-wd"
    folder = _train(tmp_path / "run", recipe, "--checkpoint-every", "1000")
    ids = [3, 100]
    assert _forget(folder, ids, "model.pt", "out.pt", "--exact") == 0
    assert _digest(folder / "out.pt") == _without(tmp_path, recipe, ids)


def test_the_router_picks_amnesiac_within_the_guard_and_exact_past_it(run, capsys):
    recipe, folder = run
    assert _forget(folder, [7], "model.pt", "m1.pt", "--max-undone", "1", "--json") == 0
    within = json.loads(capsys.readouterr().out)
    assert within["tier"] == "amnesiac" and within["route"]["reason"] == "within the guard"
    assert _forget(folder, [8], "m1.pt", "m2.pt", "--json") == 0  # past the default guard (1.28 % at r = 0.1)
    past = json.loads(capsys.readouterr().out)
    assert past["tier"] == "exact" and "past the guard" in past["route"]["reason"]
    est = past["route"]["exact"]
    assert est["replay_steps"] <= est["retrain_steps"] == 30 and est["estimated_seconds"] > 0


def test_dry_run_reports_the_route_and_writes_nothing(run, capsys):
    recipe, folder = run
    before = sorted(os.walk(folder))
    snapshot = {p: (folder / p).read_bytes() for p in ("run.ulx.requests", "model.pt")}
    assert forget_main(["--store", str(folder / "run.ulx"), "--checkpoint", str(folder / "model.pt"),
                        "--ids", _ids(folder, "x.txt", [9]), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("tier: exact") and "replay from the checkpoint at step" in out and "% of Retrain" in out
    (folder / "x.txt").unlink()
    assert sorted(os.walk(folder)) == before and all((folder / p).read_bytes() == b for p, b in snapshot.items())


def test_exact_without_checkpoints_is_refused_and_auto_says_why(tmp_path, capsys):
    folder = _train(tmp_path / "run", "mlp-adam-cosine-wd")
    with pytest.raises(SystemExit) as refused:
        _forget(folder, [7], "model.pt", "o.pt", "--exact")
    err = capsys.readouterr().err
    assert refused.value.code == 2 and len([line for line in err.splitlines() if "error:" in line]) == 1
    assert "trained without checkpoints" in err and not (folder / "o.pt").exists()
    assert _forget(folder, [7], "model.pt", "o.pt") == 3
    assert "no exact tier: its run was trained without checkpoints" in capsys.readouterr().err


def test_an_exact_request_again_is_already_served_or_redone_bitwise(run, capsys):
    recipe, folder = run
    assert _forget(folder, [11], "model.pt", "out.pt", "--exact") == 0
    served = (folder / "out.pt").read_bytes()
    assert _forget(folder, [11], "out.pt", "again.pt", "--exact") == 0
    assert "already served" in capsys.readouterr().out
    (folder / "out.pt").unlink()  # the output lost: the same command on its input redoes it
    assert _forget(folder, [11], "model.pt", "out.pt", "--exact") == 0
    assert "redone" in capsys.readouterr().out and _digest(folder / "out.pt") == state_digest(
        torch.load(io.BytesIO(served), weights_only=True))
    assert len(RequestLog(folder / "run.ulx.requests", DiskStore(folder / "run.ulx")).receipts()) == 1


@pytest.mark.parametrize("point", ["request-after-replay", "request-after-commit"])
def test_a_killed_exact_request_run_again_logs_it_once_with_the_same_output(tmp_path, point):
    """kill -9 after the generation folder is in place (not yet committed or logged), or after the output is
    committed but not logged: the same command again removes the leftover, replays again and logs once."""
    recipe = "mlp-adam-cosine-wd"
    folder = _train(tmp_path / "run", recipe, "--checkpoint-every", "4")
    args = ["--store", str(folder / "run.ulx"), "--checkpoint", str(folder / "model.pt"),
            "--ids", _ids(folder, "k.txt", [21]), "--out", str(folder / "out.pt"), "--exact"]
    env = dict(os.environ, UNLEARN_EXT_CRASH_AT=point, OMP_NUM_THREADS="1")
    code = "import sys; from unlearn_ext.deletion.commands import forget_main; sys.exit(forget_main(sys.argv[1:]))"
    killed = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    assert (folder / "run.ulx.replay" / "gen-0001").is_dir()  # the unlogged leftover
    assert forget_main(args) == 0
    log = RequestLog(folder / "run.ulx.requests", DiskStore(folder / "run.ulx"))
    assert len(log.receipts()) == 1 and log.receipts()[0].sha256_after == _digest(folder / "out.pt")
    assert _digest(folder / "out.pt") == _without(tmp_path, recipe, [21])
    assert not (folder / "run.ulx.replay" / "gen-0001.partial").exists()


def test_a_replay_on_other_data_or_another_plan_is_refused(run):
    recipe, folder = run
    log = RequestLog(folder / "run.ulx.requests", DiskStore(folder / "run.ulx"))
    header = log.header()
    other = data.load_dataset("digits", train_size=240, seed=6).train
    with pytest.raises(ValueError, match="not the data the run trained on"):
        exact.training_set(header["recipe"], other, None)
    current = exact.Generations(log.path, log.stores).current(header, [])
    train_set = exact.training_set(header["recipe"], None, None)
    plan = batch_plan(len(train_set), 16, 2, seed=6)
    with pytest.raises(ValueError, match="does not give recorded step 0's sample ids"):
        exact.check_plan(plan, train_set, current)


def test_train_keeps_checkpoints_atomically_and_says_their_size(tmp_path, capsys):
    folder = _train(tmp_path / "run", "lenet-sgd-wd", "--checkpoint-every", "10")
    out = capsys.readouterr().out
    kept = Checkpoints(str(folder / "run.ulx.replay" / "gen-0000"))
    assert kept.steps() == [0, 10, 20]
    assert "kept 3 checkpoint(s), every 10 steps" in out and f"({kept.nbytes():,} bytes" in out
    assert sorted(os.listdir(folder / "run.ulx.replay" / "gen-0000")) == [f"step-{s:010d}.pt" for s in (0, 10, 20)]


def test_a_fine_tuning_phase_replays_only_itself(tmp_path, capsys):
    """Pretraining on positions 0..159, then fine-tuning on 160..239: forgetting a fine-tuning sample replays from
    a checkpoint inside the fine-tuning phase, bitwise `train --exclude-ids` of the same phases."""
    recipe, phases = "mlp-adam-cosine-wd", ["--phases", "0:160:1,160:240:2"]
    folder = _train(tmp_path / "run", recipe, "--checkpoint-every", "4", *phases)
    assert "in phases 0:160:1,160:240:2" in capsys.readouterr().out
    assert _forget(folder, [200], "model.pt", "out.pt", "--exact", "--json") == 0
    receipt = json.loads(capsys.readouterr().out)
    assert receipt["replay"]["replay_from"] >= 8  # phase 0 is steps 0..9: never replayed
    scratch = tmp_path / "scratch"
    _train(scratch, recipe, "--exclude-ids", _ids(tmp_path, "x.txt", [200]), *phases)
    assert _digest(folder / "out.pt") == _digest(scratch / "model.pt")


@pytest.mark.parametrize("phases, match", [("0:160", "is not LO:HI:EPOCHS"), ("0:300:1", r"HI <= 240"),
                                           ("5:5:1", "LO < HI"), ("0:10:0", "EPOCHS >= 1")])
def test_bad_phases_are_refused_before_training(tmp_path, capsys, phases, match):
    with pytest.raises(SystemExit) as refused:
        _train(tmp_path / "run", "mlp-adam-cosine-wd", "--phases", phases)
    err = capsys.readouterr().err
    assert refused.value.code == 2 and re.search(match, err) and not os.listdir(tmp_path / "run")


def _served(folder):
    """The log's receipts without what differs between two runs of the same request (wall times, stamps)."""
    entries = []
    for r in RequestLog(folder / "run.ulx.requests", DiskStore(folder / "run.ulx")).receipts():
        d = r.to_dict()
        del d["seconds"], d["started_at"], d["replay"]["seconds"]
        entries.append(d)
    return entries


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_requests_killed_at_random_moments_then_rerun_give_the_uninterrupted_result(tmp_path, seed):
    """`forget --exact` forked and SIGKILLed after a random delay within the uninterrupted run's time, then run
    again: exit 0, the uninterrupted output bitwise, the same single receipt, no partial generation left."""
    recipe = "mlp-adam-cosine-wd"
    fresh = _train(tmp_path / "fresh", recipe, "--checkpoint-every", "4")
    _ids(fresh, "k.txt", [21, 130])

    def args(folder):
        return ["--store", str(folder / "run.ulx"), "--checkpoint", str(folder / "model.pt"), "--ids",
                str(folder / "k.txt"), "--out", str(folder / "out.pt"), "--exact"]

    whole = tmp_path / "whole"
    shutil.copytree(fresh, whole)
    start = time.perf_counter()
    assert forget_main(args(whole)) == 0
    seconds = time.perf_counter() - start
    trial = tmp_path / "trial"
    shutil.copytree(fresh, trial)
    pid = run_child(args(trial), None)
    time.sleep(random.Random(seed).uniform(0.0, 0.9 * seconds))
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert forget_main(args(trial)) == 0
    assert _digest(trial / "out.pt") == _digest(whole / "out.pt")
    assert _served(trial) == _served(whole) and len(_served(trial)) == 1
    replay = trial / "run.ulx.replay"
    assert sorted(os.listdir(replay)) == ["gen-0000", "gen-0001"]
    assert not [f for f in os.listdir(trial) if ".tmp" in f]


@pytest.mark.parametrize("extra, match", [([], "--out: the output state_dict to write is required"),
                                          (["--dry-run", "--new-log"], "--dry-run does nothing")])
def test_forget_without_out_or_a_dry_run_that_would_write_is_refused(run, capsys, extra, match):
    recipe, folder = run
    before = sorted(os.walk(folder))
    with pytest.raises(SystemExit) as refused:
        forget_main(["--store", str(folder / "run.ulx"), "--checkpoint", str(folder / "model.pt"), "--ids",
                     _ids(folder, "x.txt", [9]), *extra])
    (folder / "x.txt").unlink()
    assert refused.value.code == 2 and match in capsys.readouterr().err and sorted(os.walk(folder)) == before
