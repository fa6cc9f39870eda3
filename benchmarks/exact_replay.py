"""The exact tier against Retrain (issue 25, item 5): replay time, storage per checkpoint interval, and the
replayed model against the one trained from scratch without the forgotten ids.

Settings (LeNet on the whole Fashion-MNIST, batch 128, Adam at 1e-3, r = 0.1 recording, deterministic, K = 50):

* ``a`` — one epoch (469 steps); deletions whose first step is at ≈ 10 %, 50 %, 90 % of training;
* ``b`` — 8 epochs (3,752 steps); every sample first occurs in epoch 1 (the first 12.5 % of the steps), so
  any deletion replays at least 87.5 % of the run: one deletion, at ≈ 10 %, measures it;
* ``c`` — pretraining on positions 0..49,999 for 2 epochs, then fine-tuning on the 10,000 new samples
  50,000..59,999 for 2 epochs (`--phases 0:50000:2,50000:60000:2`, 940 steps); deletions of new samples
  whose first step is at ≈ 85 %, 88 %, 91 % of training (the start, middle and end of the first fine-tuning epoch).

A deletion is 64 samples whose first step is the chosen one. For each (setting, seed, deletion) the run is
trained once with its checkpoints, the request is served with ``tier="exact"`` through a fresh request log
(:class:`~unlearn_ext.deletion.RequestLog`: replay, generation written, output digest), and Retrain is the
same recipe with the ids excluded, trained from scratch without recording. Recorded: seconds of each, steps
replayed, the replayed and Retrain models' digests (equal ⇔ bitwise the same model), and TA (reported test
half), FA on the 64 ids, validation accuracy and the loss-LR MIA of both. Storage: the store's bytes and the
checkpoints' bytes for K = 10 … 500, from the measured size of one checkpoint file (all are the same size).

    python benchmarks/exact_replay.py --settings a,c,b --seeds 0,1,2 --out benchmarks/results/exact_replay.json
    python benchmarks/exact_replay.py --report benchmarks/results/exact_replay.json   # table + plot only
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Dict, List

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)  # this source tree's package

from unlearn_ext import data, metrics, models  # noqa: E402
from unlearn_ext.machine import machine_facts  # noqa: E402
from unlearn_ext.deletion import RequestLog, state_digest  # noqa: E402
from unlearn_ext.deletion.audit import Audit  # noqa: E402
from unlearn_ext.deletion.recipe import make_recipe, train_recorded  # noqa: E402
from unlearn_ext.deletion.replay import Checkpoints, run_plan_of  # noqa: E402
from unlearn_ext.protocol import validation_split  # noqa: E402
from unlearn_ext.record import DiskStore  # noqa: E402
from unlearn_ext.results import write_text  # noqa: E402

EVERY, FORGET, KS = 50, 64, (10, 25, 50, 100, 250, 500)
SETTINGS = {"a": {"epochs": 1, "phases": None, "targets": (0.10, 0.50, 0.90)},
            "b": {"epochs": 8, "phases": None, "targets": (0.10,)},
            "c": {"epochs": 4, "phases": [[0, 50000, 2], [50000, 60000, 2]], "targets": (0.85, 0.88, 0.91)}}


def _deletions(recipe: dict, train_set, targets) -> List[Dict]:
    """For each target fraction: the plan step nearest to it where at least FORGET samples first occur, and
    FORGET of those samples."""
    plan = run_plan_of(recipe, len(train_set))
    first: Dict[int, List[int]] = {}
    seen = torch.zeros(len(train_set), dtype=torch.bool)
    for t, batch in enumerate(plan):
        new = batch[~seen[batch]]
        seen[batch] = True
        if new.numel() >= FORGET:
            first[t] = train_set.ids[new[:FORGET]].tolist()
    out = []
    for p in targets:
        step = min(first, key=lambda t: abs(t - p * len(plan)))
        out.append({"target": p, "first_step": step, "fraction": step / len(plan), "ids": sorted(first[step])})
    return out


def _figures(splits, model_name, ids, seed, state) -> Dict:
    audit = Audit(splits, model_name, ids, seed)(state)
    net = models.make_model(model_name, splits.input_shape, splits.num_classes)
    net.load_state_dict(dict(state))
    test = validation_split(splits.test, seed)[1]
    return {"TA": metrics.accuracy(net, data.loader(test, 1024)), "FA": audit["forget_accuracy"],
            "VA": audit["validation_accuracy"], "MIA": audit["loss_lr_mia"]}


def one_run(setting: str, seed: int, workdir: str) -> Dict:
    cfg = SETTINGS[setting]
    splits = data.load_dataset("fashion_mnist", seed=seed)
    recipe = make_recipe(splits, "lenet", seed=seed, epochs=cfg["epochs"], phases=cfg["phases"], keep_ratio=0.1)
    base = os.path.join(workdir, f"{setting}-{seed}")
    os.makedirs(base)
    store_path, ckpt = os.path.join(base, "run.ulx"), os.path.join(base, "run.ulx.replay", "gen-0000")
    os.makedirs(os.path.dirname(ckpt))
    model, store, train_seconds, steps = train_recorded(splits, recipe, store_path, checkpoints=ckpt, every=EVERY)
    kept = Checkpoints(ckpt)
    one_checkpoint = os.path.getsize(kept.path(0))
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    replay = {"folder": "run.ulx.replay", "every": EVERY, "train_seconds": train_seconds, "train_steps": steps}
    row = {"setting": setting, "seed": seed, "model": "lenet", "recipe": {k: v for k, v in recipe.items()
                                                                          if k != "exclude_ids"},
           "plan_steps": steps, "train_seconds_recorded": train_seconds, "store_bytes": store.nbytes(),
           "checkpoint_bytes": one_checkpoint, "checkpoints": len(kept.steps()), "deletions": []}
    for i, d in enumerate(_deletions(recipe, splits.train, cfg["targets"])):
        folder = os.path.join(base, f"request-{i}")  # a fresh log per deletion: each from the trained model
        os.makedirs(os.path.join(folder, "run.ulx.replay", "gen-0000"))
        os.link(store_path, os.path.join(folder, "run.ulx"))
        for s in kept.steps():
            os.link(kept.path(s), os.path.join(folder, "run.ulx.replay", "gen-0000", os.path.basename(kept.path(s))))
        log = RequestLog.create(os.path.join(folder, "run.ulx.requests"), [DiskStore(os.path.join(folder, "run.ulx"))], trained, recipe=recipe,
                                replay=replay)
        state = {k: v.clone() for k, v in trained.items()}
        receipt = log.forget(state, f"p{d['target']}", d["ids"], tier="exact", training_data=splits.train)
        start = time.perf_counter()
        retrain, _, _, retrain_steps = train_recorded(splits, dict(recipe, exclude_ids=d["ids"]), None)
        retrain_seconds = time.perf_counter() - start
        retrained = retrain.state_dict()
        same = state_digest(state) == state_digest(retrained)
        row["deletions"].append({
            "target": d["target"], "first_step": d["first_step"], "first_step_fraction": d["fraction"],
            "n_ids": len(d["ids"]), "replay_from": receipt.replay["replay_from"],
            "replayed_steps": receipt.replay["replayed_steps"], "replay_seconds": receipt.seconds,
            "estimated_seconds": receipt.route["exact"]["estimated_seconds"],
            "retrain_steps": retrain_steps, "retrain_seconds": retrain_seconds,
            "speedup": retrain_seconds / receipt.seconds, "digests_equal": same,
            "replayed": _figures(splits, "lenet", d["ids"], seed, state),
            "retrain": None if same else _figures(splits, "lenet", d["ids"], seed, retrained),
            "original": _figures(splits, "lenet", d["ids"], seed, trained)})
        shutil.rmtree(folder)
    shutil.rmtree(base)
    return row


def _ms(values) -> str:
    values = list(values)
    if len(values) < 2:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def report(path: str) -> None:
    with open(path) as f:
        doc = json.load(f)
    rows = doc["runs"]
    out = [f"# Exact tier: replay against Retrain (LeNet, Fashion-MNIST, K = {EVERY}, {FORGET} ids per deletion)",
           "", f"Generated by `python benchmarks/exact_replay.py --report {os.path.relpath(path, _ROOT)}` from the "
           "raw per-seed rows beside it. Machine: " + ", ".join(f"{k} {v}" for k, v in doc["machine"].items()), "",
           "Replay = `forget --exact`'s work through the request log (checkpoint load, plan check, prefix records "
           "copied, the replay recorded into a new generation, model saved); Retrain = the same recipe without the "
           "ids from scratch, not recorded. Digests equal: the replayed model is bitwise Retrain's, so TA/FA/MIA "
           "are the same numbers (shown once).", "",
           "Seeds run per setting: " + ", ".join(f"{s} {sum(r['setting'] == s for r in rows)}" for s in SETTINGS)
           + " (of the 3 planned). Times are wall time on the machine above: with a load average above its 2 "
           "cores they swing by 2× between identical trainings, so read speed-ups from one seed as rough.", "",
           "| setting | seeds | first step (% of T) | replayed steps / T | replay s | Retrain s | speed-up | "
           "estimate s | digests equal | TA | FA | MIA | original FA |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for setting in SETTINGS:
        runs = [r for r in rows if r["setting"] == setting]
        if not runs:
            continue
        for i in range(len(runs[0]["deletions"])):
            ds = [r["deletions"][i] for r in runs]
            equal = sum(d["digests_equal"] for d in ds)
            out.append(f"| {setting} | {len(ds)} | {_ms(100 * d['first_step_fraction'] for d in ds)} | "
                       f"{_ms(d['replayed_steps'] / r['plan_steps'] for d, r in zip(ds, runs))} | "
                       f"{_ms(d['replay_seconds'] for d in ds)} | {_ms(d['retrain_seconds'] for d in ds)} | "
                       f"{_ms(d['speedup'] for d in ds)}× | {_ms(d['estimated_seconds'] for d in ds)} | "
                       f"{equal}/{len(ds)} | {_ms(d['replayed']['TA'] for d in ds)} | "
                       f"{_ms(d['replayed']['FA'] for d in ds)} | {_ms(d['replayed']['MIA'] for d in ds)} | "
                       f"{_ms(d['original']['FA'] for d in ds)} |")
    out += ["", "## Storage against the checkpoint interval K", "",
            "Checkpoint = model + Adam state + RNG state (one file, the same size at every step). Bytes for other K "
            "are ⌈T/K⌉ × the measured file size; a replay starts on average K/2 steps before t_min.", "",
            "| setting | T | store bytes | one checkpoint | " + " | ".join(f"K = {k}" for k in KS) + " |",
            "|---|---|---|---|" + "---|" * len(KS)]
    for setting in SETTINGS:
        runs = [r for r in rows if r["setting"] == setting]
        if runs:
            r = runs[0]
            cells = [f"{math.ceil(r['plan_steps'] / k) * r['checkpoint_bytes']:,} "
                     f"({100 * math.ceil(r['plan_steps'] / k) * r['checkpoint_bytes'] / r['store_bytes']:.1f} %)"
                     for k in KS]
            out.append(f"| {setting} | {r['plan_steps']} | {r['store_bytes']:,} | {r['checkpoint_bytes']:,} | "
                       + " | ".join(cells) + " |")
    write_text("\n".join(out) + "\n", path[:-5] + ".md")
    _plot(rows, path[:-5] + ".png")


def _plot(rows, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for setting, marker in zip(SETTINGS, "osd"):
        pts = [(d["first_step_fraction"], d["retrain_seconds"] / d["replay_seconds"]) for r in rows
               if r["setting"] == setting for d in r["deletions"]]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, label=f"setting {setting}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("first step of the deleted ids (fraction of training)")
    ax.set_ylabel("Retrain seconds / replay seconds")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", default="a,c,b")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default=os.path.join(_ROOT, "benchmarks", "results", "exact_replay.json"))
    p.add_argument("--report", default=None, help="only write the table and plot from this JSON")
    args = p.parse_args(argv)
    if args.report:
        report(args.report)
        return 0
    torch.use_deterministic_algorithms(True)
    doc = {"machine": machine_facts(), "runs": []}
    if os.path.exists(args.out):
        with open(args.out) as f:
            doc["runs"] = json.load(f)["runs"]
    done = {(r["setting"], r["seed"]) for r in doc["runs"]}
    with tempfile.TemporaryDirectory() as work:
        for setting in args.settings.split(","):
            for seed in map(int, args.seeds.split(",")):
                if (setting, seed) in done:
                    continue
                doc["runs"].append(one_run(setting, seed, work))
                write_text(json.dumps(doc, indent=1), args.out)
                print(f"{setting} seed {seed}: " + ", ".join(
                    f"{d['first_step_fraction']:.2f}: {d['speedup']:.1f}x equal={d['digests_equal']}"
                    for d in doc["runs"][-1]["deletions"]), flush=True)
    report(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
