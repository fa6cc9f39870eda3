"""A stream of single-sample deletion requests served over the life of a model (issue 24, item 8).

For each model and seed: train on the whole Fashion-MNIST training set (8 epochs, batch 128, Adam at the
model's rate, deterministic) recording partial updates (r = 0.1, float32), then serve ``--requests``
single-sample requests one after another through a :class:`~unlearn_ext.deletion.RequestLog` on the model
in memory, with the guard lifted (``max_undone=1``) so that the stream goes on past the point where the
default guard (r = 0.1) refuses — that point is marked. Per request: milliseconds of work, steps newly undone,
cumulative fraction of recorded steps undone, TA (reported test half), FA on the request's id (0 or 1), and
whether the default guard would have refused it. The first request is also served through the command
line's code (`unlearn-ext forget` in-process: opening the store and the log, loading and writing the
checkpoints) and timed, without process start.

At the end the stream's model is compared with the same ids forgotten at once (the same steps must be
undone; weights differ only by the order of the float sums) and with Retrain (trained from scratch without
the forgotten ids, same recipe and seed).

    python benchmarks/request_stream.py --models lenet,mlp --seeds 0,1,2 --out benchmarks/results/request_stream.json
    python benchmarks/request_stream.py --report benchmarks/results/request_stream.json   # table + plot only

The raw rows go to ``--out`` (JSON, written after every run, so ``--resume`` keeps finished runs); the table
(``.md``) and plot (``.png``) beside it are made from the JSON alone.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Dict, List, Optional

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)  # this source tree's package

from unlearn_ext import data, metrics, models  # noqa: E402
from unlearn_ext.deletion import RequestLog, default_limit, state_digest  # noqa: E402
from unlearn_ext.deletion.commands import forget_main  # noqa: E402
from unlearn_ext.deletion.recipe import make_recipe, train_recorded  # noqa: E402
from unlearn_ext.machine import machine_facts  # noqa: E402
from unlearn_ext.protocol import validation_split  # noqa: E402
from unlearn_ext.record import DiskStore  # noqa: E402
from unlearn_ext.results import write_text  # noqa: E402

KEEP_RATIO = 0.1


def _accuracy(model, ds) -> float:
    return metrics.accuracy(model, data.loader(ds, 1024))


def one_run(model_name: str, seed: int, n_requests: int, workdir: str, train_size: Optional[int] = None,
            epochs: int = 8) -> Dict:
    splits = data.load_dataset("fashion_mnist", train_size=train_size, seed=seed)
    test = validation_split(splits.test, seed)[1]
    recipe = make_recipe(splits, model_name, train_size=train_size, seed=seed, epochs=epochs, keep_ratio=KEEP_RATIO,
                         value_dtype="float32")
    store_path = os.path.join(workdir, f"{model_name}-{seed}.ulx")
    model, store, train_seconds, _ = train_recorded(splits, recipe, store_path)
    store = DiskStore(store_path)
    g = torch.Generator().manual_seed(10_000 + seed)
    ids = splits.train.ids[torch.randperm(len(splits.train), generator=g)[:n_requests]].tolist()
    limit = default_limit(KEEP_RATIO)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    original_ta = _accuracy(model, test)

    # the first request through the command line's code, timed without process start
    folder = os.path.join(workdir, f"cli-{model_name}-{seed}")
    os.makedirs(folder)
    torch.save(original, os.path.join(folder, "in.pt"))
    with open(os.path.join(folder, "ids.txt"), "w") as f:
        f.write(f"{ids[0]}\n")
    start = time.perf_counter()
    code = forget_main(["--store", store_path, "--checkpoint", os.path.join(folder, "in.pt"), "--ids",
                        os.path.join(folder, "ids.txt"), "--out", os.path.join(folder, "out.pt"),
                        "--log", os.path.join(folder, "requests"), "--request-id", "r0", "--max-undone", "1"])
    cli_seconds = time.perf_counter() - start
    assert code == 0, f"forget exited {code}"

    log = RequestLog.create(os.path.join(workdir, f"{model_name}-{seed}.requests"), store, model)
    requests = []
    for i, sample in enumerate(ids):
        receipt = log.forget(model, f"r{i}", [sample], max_undone=1.0)
        x, y, _ = splits.train[sample]
        fa = float(model.eval()(x[None]).argmax(1).item() == int(y))
        requests.append({"request": i, "id": sample, "ms": 1000 * receipt.seconds, "steps_new": len(receipt.steps_new),
                         "steps_skipped": len(receipt.steps_skipped), "fraction_undone": receipt.fraction_undone,
                         "TA": _accuracy(model, test), "FA_request": fa,
                         "default_guard_refuses": bool(receipt.steps_new) and receipt.fraction_undone > limit})
    assert state_digest(torch.load(os.path.join(folder, "out.pt"))) == log.receipts()[0].sha256_after

    at_once = {k: v.clone() for k, v in original.items()}
    all_steps = store.steps_containing(ids)
    store.apply_to(at_once, all_steps)
    same_steps = sorted(log.undone_steps()) == all_steps
    stream_state = model.state_dict()
    max_diff = max(float((stream_state[k].float() - at_once[k].float()).abs().max()) for k in at_once)
    at_once_model = _model_with(model_name, splits, at_once)

    forget_ds, retain_ds = data.split_forget(splits.train, torch.tensor(ids))
    retrain, _, retrain_seconds, _ = train_recorded(splits, recipe, None, train_set=retain_ds)
    fa = {name: _accuracy(m, forget_ds) for name, m in (("original", _model_with(model_name, splits, original)),
                                                        ("stream", model), ("at_once", at_once_model),
                                                        ("retrain", retrain))}
    trips = next((r["request"] for r in requests if r["default_guard_refuses"]), None)
    os.remove(store_path)
    return {"model": model_name, "seed": seed, "train_size": len(splits.train), "epochs": epochs,
            "recorded_steps": len(store), "store_bytes": store.nbytes(),
            "train_seconds": train_seconds, "retrain_seconds": retrain_seconds, "cli_first_request_seconds": cli_seconds,
            "default_limit": limit, "guard_trips_at_request": trips, "requests": requests,
            "end": {"same_steps_as_at_once": same_steps, "steps_undone": len(all_steps),
                    "max_abs_weight_diff_vs_at_once": max_diff, "TA_original": original_ta,
                    "TA_stream": requests[-1]["TA"], "TA_at_once": _accuracy(at_once_model, test),
                    "TA_retrain": _accuracy(retrain, test), "FA_forgotten": fa},
            "environment": {"threads": torch.get_num_threads(), "load_average_at_end": os.getloadavg()[0]}}


def _model_with(model_name, splits, state):
    net = models.make_model(model_name, splits.input_shape, splits.num_classes)
    net.load_state_dict(state)
    return net


def _mean_std(xs: List[float]) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def report(doc: Dict, path: str) -> None:
    runs = doc["runs"]
    loads = ", ".join(f"{r['model']} seed {r['seed']} {r['environment']['load_average_at_end']:.1f}" for r in runs)
    lines = ["# A stream of single-sample deletion requests", "",
             f"Generated from `{os.path.basename(path)}` by `python benchmarks/request_stream.py --report {path}`. "
             f"Machine: {doc['machine'].get('Model name')}, {doc['machine']['cpu_count']} CPUs, torch "
             f"{doc['machine']['torch']}, {runs[0]['environment']['threads']} threads.", "",
             f"Fashion-MNIST, {runs[0]['train_size']:,} training images, {runs[0]['epochs']} epochs at batch 128, "
             f"Adam at the model's rate, deterministic; partial updates recorded at r = {KEEP_RATIO} (float32). Each request forgets one "
             "random training image; the stream runs with the guard lifted, and the default guard's limit "
             f"({100 * runs[0]['default_limit']:.2f} % of recorded steps, from amnesiac_regime.md) marks where it "
             "would have refused. TA: the reported test half (5,000 images). FA on its id: whether the model still "
             "classifies the request's image right (Retrain classifies most of them right too: see the end state). "
             "ms: the request's work in the log (digests, apply, log entry), model in memory. Times are wall time on "
             "a 2-core machine shared with other jobs (load average at the end of each run: "
             f"{loads}).", ""]
    for model in sorted({r["model"] for r in runs}):
        mine = [r for r in runs if r["model"] == model]
        n = len(mine[0]["requests"])
        lines += [f"## {model}", "", "| request | steps newly undone | fraction undone | TA | TA − original | "
                  "FA on its id | ms | default guard |", "|---|---|---|---|---|---|---|---|"]
        for i in sorted({0, 1, 2, 4, 9, 19, 29, 39, n - 1} & set(range(n))):
            rows = [r["requests"][i] for r in mine]
            refuses = sum(r["default_guard_refuses"] for r in rows)
            lines.append(f"| {i + 1} | {_mean_std([r['steps_new'] for r in rows])} | "
                         f"{_mean_std([100 * r['fraction_undone'] for r in rows])} % | "
                         f"{_mean_std([r['TA'] for r in rows])} | "
                         f"{_mean_std([r['TA'] - m['end']['TA_original'] for r, m in zip(rows, mine)])} | "
                         f"{_mean_std([r['FA_request'] for r in rows])} | {_mean_std([r['ms'] for r in rows])} | "
                         f"{'refuses' if refuses == len(rows) else f'refuses in {refuses}/{len(rows)} seeds' if refuses else 'serves'} |")
        ends = [r["end"] for r in mine]
        trips = [r["guard_trips_at_request"] for r in mine]
        lines += ["", f"- The default guard first refuses at request {', '.join(str(t + 1) if t is not None else 'never' for t in trips)} "
                  f"(seeds {', '.join(str(r['seed']) for r in mine)}).",
                  f"- Milliseconds per request, all {n} × {len(mine)}: median "
                  f"{statistics.median([q['ms'] for r in mine for q in r['requests']]):.1f}, max "
                  f"{max(q['ms'] for r in mine for q in r['requests']):.1f}. The first request through the command "
                  f"line's code (store, log and checkpoint opened, output written; no process start): "
                  f"{', '.join(str(round(1000 * r['cli_first_request_seconds'])) for r in mine)} ms.",
                  f"- End state ({n} ids): the same steps undone as forgetting them at once in "
                  f"{sum(e['same_steps_as_at_once'] for e in ends)}/{len(ends)} seeds "
                  f"({_mean_std([e['steps_undone'] for e in ends])} steps, "
                  f"{_mean_std([100 * r['requests'][-1]['fraction_undone'] for r in mine])} % of those recorded); "
                  f"largest weight difference to the at-once model {max(e['max_abs_weight_diff_vs_at_once'] for e in ends):.2g} "
                  "(float sums in another order).",
                  f"- TA: original {_mean_std([e['TA_original'] for e in ends])}, stream "
                  f"{_mean_std([e['TA_stream'] for e in ends])}, at once {_mean_std([e['TA_at_once'] for e in ends])}, "
                  f"Retrain {_mean_std([e['TA_retrain'] for e in ends])}. FA on the {n} forgotten images: original "
                  f"{_mean_std([e['FA_forgotten']['original'] for e in ends])}, stream "
                  f"{_mean_std([e['FA_forgotten']['stream'] for e in ends])}, Retrain "
                  f"{_mean_std([e['FA_forgotten']['retrain'] for e in ends])}.",
                  f"- Training with recording {_mean_std([r['train_seconds'] for r in mine])} s, Retrain "
                  f"{_mean_std([r['retrain_seconds'] for r in mine])} s; store "
                  f"{statistics.mean(r['store_bytes'] for r in mine) / 2**20:.0f} MiB.", ""]
    base = os.path.splitext(path)[0]
    write_text("\n".join(lines) + "\n", base + ".md")
    _plot(runs, base + ".png")


def _plot(runs: List[Dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in runs})
    fig, axes = plt.subplots(2, len(models), figsize=(5.5 * len(models), 7), squeeze=False)
    for col, model in enumerate(models):
        for r in (r for r in runs if r["model"] == model):
            xs = [q["request"] + 1 for q in r["requests"]]
            axes[0][col].plot(xs, [100 * q["fraction_undone"] for q in r["requests"]], label=f"seed {r['seed']}")
            axes[1][col].plot(xs, [q["TA"] for q in r["requests"]], label=f"seed {r['seed']}")
            axes[1][col].axhline(r["end"]["TA_retrain"], color="grey", lw=0.8, ls=":")
        axes[0][col].axhline(100 * runs[0]["default_limit"], color="red", ls="--", label="default guard limit")
        axes[0][col].set(title=f"{model}: recorded steps undone", xlabel="request", ylabel="% of recorded steps")
        axes[1][col].set(title=f"{model}: test accuracy (dotted: Retrain of all ids)", xlabel="request", ylabel="TA")
        axes[0][col].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="lenet,mlp")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--train-size", type=int, default=0, help="a seeded subsample (0: the whole training set)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results/request_stream.json")
    ap.add_argument("--resume", action="store_true", help="keep the finished (model, seed) runs of --out")
    ap.add_argument("--report", metavar="JSON", help="only make the table and plot from this JSON")
    args = ap.parse_args(argv)
    if args.report:
        with open(args.report) as f:
            report(json.load(f), args.report)
        return 0
    doc = {"machine": machine_facts(), "runs": []}
    if args.resume and os.path.exists(args.out):
        with open(args.out) as f:
            doc["runs"] = json.load(f)["runs"]
    done = {(r["model"], r["seed"]) for r in doc["runs"]}
    with tempfile.TemporaryDirectory() as workdir:
        for model in args.models.split(","):
            for seed in map(int, args.seeds.split(",")):
                if (model, seed) in done:
                    continue
                doc["runs"].append(one_run(model, seed, args.requests, workdir, args.train_size or None, args.epochs))
                write_text(json.dumps(doc, indent=1), args.out)
                print(f"{model} seed {seed} done", flush=True)
    report(doc, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
