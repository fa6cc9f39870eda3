"""The amnesiac regime, mapped (docs/protocol.md#the-amnesiac-regime): forgetting (FA and the SVC-MIA gap to
Retrain) and damage (TA to Retrain) against the fraction of training steps that amnesiac unlearning undoes.

    # the leaking setting (the demo's: the original memorises its training set and leaks membership)
    python benchmarks/amnesiac_regime.py --leaking --seeds 0,1,2 --resume \
        --out benchmarks/results/amnesiac_regime_leaking
    # the full-size setting (full Fashion-MNIST, 8 epochs at batch 128: the original hardly memorises)
    python benchmarks/amnesiac_regime.py --models mlp,lenet --seeds 0,1,2 \
        --sizes 6,20,60,200,600 --out benchmarks/results/amnesiac_regime
    # split over processes (one --store-dir each), then one report from their rows:
    python benchmarks/amnesiac_regime.py --models lenet --store-dir /tmp/a --out /tmp/lenet &
    python benchmarks/amnesiac_regime.py --models mlp --store-dir /tmp/b --out /tmp/mlp
    python benchmarks/amnesiac_regime.py --report /tmp/lenet.json,/tmp/mlp.json --out benchmarks/results/amnesiac_regime

Each (model, seed) trains one original while recording the dense update of every step (naive amnesiac) and
the layer-wise top-k pruned one at every r of ``--keep-ratios`` (partial amnesiac). Forget sets of the given
sizes are then drawn nested from one seeded permutation of the training ids — a forget set of n samples at
batch B holds a sample in about 1 − (1 − n/|D|)^B of the steps — and for each: Retrain, naive amnesiac with
its fine-tune epoch and without, partial amnesiac (no fine-tune) at each r and, with ``--repair``, naive and
partial amnesiac followed by the calibrated repair (``repair=True``, ``repair_target`` = the forgetting target:
the original's validation accuracy). ``--leaking`` takes the demo's setting (``unlearn_ext.experiment.DEMO``:
3,000 training images, batch 8, 40 epochs, float16 records) with LeNet, sizes 4–450 (≈ 1–70 % of steps),
r ∈ {0.01, 0.1, 0.5} and the repair rows; a flag given beside it overrides it.

The regime rule is two-sided and per seed (:func:`_seed_call`, :func:`_cell_call`; the margins are stated in
the report's header). Writes ``<out>.json`` (every row of every seed, with the setting, thread count and load),
``<out>.md`` (generated from the JSON alone: ``--report <out>.json`` rewrites it) and ``<out>.png``. Runs
are deterministic (``ExperimentConfig.deterministic``) for the recorded thread count. Stores are DiskStores in
``--store-dir`` (removed after each seed: about 10 GB for the MLP at full size, 4 GB per LeNet seed in the
leaking setting). Only the store files this run writes are removed (a crashed earlier run's stores of the same
names are replaced with a warning); other files in the folder are left alone.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys

import torch
from scipy import stats as scipy_stats

from unlearn_ext import results
from unlearn_ext.experiment import DEMO, PAPER_KEEP_RATIOS, Experiment, ExperimentConfig
from unlearn_ext.machine import describe_machine

#: TA within this many points of Retrain's, either way, is "TA within" (the README's claim).
TA_POINTS = 0.02
#: Forgetting margin: a row forgot when its FA and its SVC-MIA figure (each a fraction of the n forget samples)
#: are within MARGIN_SE binomial standard errors of Retrain's seed mean p at that size, √(p(1 − p)/n) — the
#: seed-to-seed spread a Retrain's figure has from the draw of n forget samples alone — with p(1 − p) at least
#: MIN_VARIANCE (its value at p = 0.1), so a Retrain mean at 0 or 1 does not give a zero margin.
MARGIN_SE = 2.0
MIN_VARIANCE = 0.09
#: Two-sided 95 % intervals of a cell's seed values: mean ± t(0.975, k − 1) · sd / √k.
CONFIDENCE = 0.95
ORIGINAL = "original (no unlearning)"
REPAIR = " + repair"
#: The leaking setting (``--leaking``): the demo's data and recipe, LeNet, forget sets spanning ≈ 1–70 % of
#: the steps at batch 8 on 3,000 samples, a reduced r sweep and the repair rows.
LEAKING = dict(models="lenet", sizes="4,12,50,150,450", keep_ratios="0.01,0.1,0.5", repair=True,
               train_size=DEMO["train_size"], test_size=DEMO["test_size"], epochs=DEMO["epochs"],
               batch_size=DEMO["batch_size"], value_dtype=DEMO["value_dtype"])
FULL = dict(models="mlp,lenet", sizes="6,20,60,200,600", keep_ratios=",".join(f"{r:g}" for r in PAPER_KEEP_RATIOS),
            repair=False, train_size=0, test_size=0, epochs=8, batch_size=128, value_dtype="float32")
COLUMNS = [("steps undone", "undone", "{:.1%}"), ("TA", "TA", "{:.3f}"), ("RA", "RA", "{:.3f}"), ("FA", "FA", "{:.3f}"),
           ("LR-MIA − Retrain", "dLR", "{:+.3f}"), ("seconds", "seconds", "{:.2f}"), ("RTE", "rte", "{:.1f}")]
INTERVALS = [("TA − Retrain", "dTA"), ("FA − Retrain", "dFA"), ("SVC MIA − Retrain", "dMIA")]


def _variant_rows(exp: Experiment, ids: torch.Tensor, repair: bool) -> dict:
    """Retrain, amnesiac with its fine-tune, amnesiac without it and partial amnesiac at each r, for ``ids``;
    with ``repair``, amnesiac and partial amnesiac at each r followed by the calibrated repair to the run's
    forgetting target."""
    exp.cfg.method_hparams = {}
    result = exp.run(ids, progress=False)
    rows = result["rows"]
    exp.cfg.method_hparams = {"amnesiac": {"finetune": False}}
    rows["amnesiac (no fine-tune)"] = exp.run(ids, progress=False, methods=["amnesiac"])["rows"]["amnesiac"]
    rows["amnesiac (fine-tune 1 epoch)"] = rows.pop("amnesiac")
    if repair:
        hp = {"repair": True, "repair_target": result["forgetting_target"]["value"]}
        exp.cfg.method_hparams = {"amnesiac": hp, "partial_amnesiac": hp}
        repaired = exp.run(ids, progress=False, methods=["amnesiac", "partial_amnesiac"])["rows"]
        rows.update({_sweep_name(exp, name) + REPAIR: row for name, row in repaired.items() if name != "original"})
    exp.cfg.method_hparams = {}
    return {_sweep_name(exp, name): row for name, row in rows.items()}


def _sweep_name(exp: Experiment, name: str) -> str:
    """A single r's partial amnesiac row named as a sweep would name it."""
    return f"partial_amnesiac r={exp.cfg.ratios()[0]:g}" if name == "partial_amnesiac" else name


def _point(row: dict, retrain: dict, undone: float, original: bool = False) -> dict:
    lr = row.get("LR_MIA")
    seconds = None if original else row["seconds"]
    return {"undone": undone, "TA": row["TA"], "dTA": row["TA"] - retrain["TA"], "RA": row["RA"], "FA": row["FA"],
            "dFA": row["FA"] - retrain["FA"], "MIA": row["MIA"], "dMIA": row["MIA"] - retrain["MIA"],
            "dLR": None if lr is None or retrain.get("LR_MIA") is None else lr - retrain["LR_MIA"],
            "seconds": seconds, "rte": retrain["seconds"] / seconds if seconds else None,
            "n_forget": row["n_forget"], "met": bool(row.get("verdict", {}).get("met"))}


def _mean_std(values, fmt: str) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return ""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{fmt.format(statistics.fmean(values))} ± {fmt.format(std).lstrip('+')}"


def _interval(values) -> tuple:
    """(mean, low, high): the two-sided :data:`CONFIDENCE` t-interval of the seed values (a point for one)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, mean, mean
    half = scipy_stats.t.ppf(0.5 + CONFIDENCE / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def _margins(retrain_points: list) -> dict:
    """The forgetting margins of one size (:data:`MARGIN_SE`) from Retrain's seed means there."""
    n = statistics.fmean(p["n_forget"] for p in retrain_points)

    def margin(key):
        p = statistics.fmean(q[key] for q in retrain_points)
        return MARGIN_SE * math.sqrt(max(p * (1 - p), MIN_VARIANCE) / n)
    return {"dTA": TA_POINTS, "dFA": margin("FA"), "dMIA": margin("MIA")}


def _seed_call(point: dict, original: dict, margins: dict) -> str:
    """One seed of one cell: "within" when the row forgot (FA and SVC MIA within their margins of Retrain's) and
    its TA is within :data:`TA_POINTS` of Retrain's, but "unmeasurable" when the original itself (no unlearning)
    is within the forgetting margins in that seed, so forgetting cannot be told from none; else "outside"."""
    def forgot(p):
        return abs(p["dFA"]) <= margins["dFA"] and abs(p["dMIA"]) <= margins["dMIA"]
    if not (forgot(point) and abs(point["dTA"]) <= TA_POINTS):
        return "outside"
    return "unmeasurable" if forgot(original) else "within"


def _side(values, bound: float) -> str:
    """Where the seed values' interval lies against ±bound: "in", "out" or "straddles"."""
    _, low, high = _interval(values)
    if -bound <= low and high <= bound:
        return "in"
    return "out" if high < -bound or low > bound else "straddles"


def _cell_call(points: list, originals: list, margins: dict) -> str:
    """A cell over its seeds, from the intervals of TA − Retrain, FA − Retrain and SVC MIA − Retrain against
    ±their margins: *outside* when one interval lies wholly outside; *unmeasurable* (forgetting) when the
    original's FA and MIA intervals lie wholly inside, i.e. no unlearning at all would pass; *within* when all
    three lie inside and the original's do not; else *inconclusive* (an interval straddles a boundary)."""
    sides = {k: _side([p[k] for p in points], margins[k]) for k in margins}
    if "out" in sides.values():
        return "outside"
    original = [_side([p[k] for p in originals], margins[k]) for k in ("dFA", "dMIA")]
    if original == ["in", "in"]:
        return "unmeasurable"
    if set(sides.values()) == {"in"} and "out" in original:
        return "within"
    return "inconclusive"


def _cells(points: dict):
    """(size, margins, original points, {method: (points, seed calls, cell call)}) for each size of one model."""
    for size, by_name in sorted(points.items()):
        margins = _margins(by_name["retrain"])
        originals = by_name[ORIGINAL]
        calls = {}
        for name, ps in by_name.items():
            if name in ("retrain", ORIGINAL):
                continue
            by_seed = {p["seed"]: p for p in originals}
            calls[name] = (ps, [_seed_call(p, by_seed[p["seed"]], margins) for p in ps],
                           _cell_call(ps, originals, margins))
        yield size, margins, originals, calls


def _method_order(name: str) -> tuple:
    return (name != "retrain", name != ORIGINAL, not name.startswith("amnesiac"), name.endswith(REPAIR), name)


def _regime_statement(model: str, points: dict) -> str:
    """Per method, the cell call at each measured fraction of steps undone, with the seeds within."""
    by_method: dict = {}
    for size, _, _, calls in _cells(points):
        for name, (ps, seed_calls, call) in calls.items():
            undone = statistics.fmean(p["undone"] for p in ps)
            by_method.setdefault(name, []).append(
                f"{undone:.1%} {call} ({seed_calls.count('within')}/{len(ps)})")
    lines = [f"**{model}**, the cell call at each fraction of steps undone (seeds within / seeds):", ""]
    lines += [f"- {name}: " + ", ".join(parts) + "." for name, parts in sorted(by_method.items(),
                                                                              key=lambda kv: _method_order(kv[0]))]
    return "\n".join(lines)


def _plot(all_points: dict, path: str) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(all_points)
    panels = [("TA", "test accuracy", "TA (mean ± std over seeds)"),
              ("dFA", "FA minus Retrain's", "forget accuracy − Retrain's (0 is ideal)"),
              ("dMIA", "SVC MIA minus Retrain's", "member fraction of D_f − Retrain's (0 is ideal)")]
    fig, axes = plt.subplots(len(panels), len(models), figsize=(7 * len(models), 11), squeeze=False)
    names = sorted({n for pts in all_points.values() for by_name in pts.values() for n in by_name}, key=_method_order)
    colour = {n: f"C{i % 10}" for i, n in enumerate(names)}  # one colour per method in every panel
    for j, model in enumerate(models):
        for name in names:
            for i, (key, _, _) in enumerate(panels):
                xs, ys, errs = [], [], []
                for size, by_name in sorted(all_points[model].items()):
                    ps = by_name.get(name)
                    if ps:
                        xs.append(100 * statistics.fmean(p["undone"] for p in by_name["retrain"]))
                        ys.append(statistics.fmean(p[key] for p in ps))
                        errs.append(statistics.stdev(p[key] for p in ps) if len(ps) > 1 else 0)
                if xs and (key == "TA" or name != "retrain"):
                    axes[i][j].errorbar(xs, ys, yerr=errs, label=name, marker="o", capsize=2, lw=1.2,
                                        ls="--" if name in ("retrain", ORIGINAL) or name.endswith(REPAIR) else "-",
                                        color=colour[name])
        for i, (key, title, ylabel) in enumerate(panels):
            ax = axes[i][j]
            ax.set_title(f"{model}: {title}")
            ax.set_ylabel(ylabel)
            if key != "TA":
                ax.axhline(0, color="grey", lw=0.8)
            ax.set_xscale("log")
            ax.set_xticks([1, 2, 5, 10, 20, 50, 100])
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel("training steps undone (%)")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _points(raw: list) -> dict:
    """``{model: {size: {method: [point per seed]}}}`` from the raw rows of complete (model, seed) runs; the
    original (no unlearning) is a row read against Retrain like the others."""
    all_points: dict = {}
    for rec in raw:
        by_size = all_points.setdefault(rec["model"], {}).setdefault(rec["size"], {})
        rows = rec["rows"]
        for name, row in rows.items():
            point = _point(row, rows["retrain"], rec["undone"], original=name == "original")
            by_size.setdefault(ORIGINAL if name == "original" else name, []).append(dict(point, seed=rec["seed"]))
    return {m: dict(sorted(v.items())) for m, v in all_points.items()}


def _complete(raw: list, sizes: list) -> list:
    """The rows of the (model, seed) runs that reached every size (a run cut short is redone whole: its
    training is the cost, and the forget sets are nested in one permutation)."""
    done = {(r["model"], r["seed"]) for r in raw}
    done = {k for k in done if {r["size"] for r in raw if (r["model"], r["seed"]) == k} >= set(sizes)}
    return [r for r in raw if (r["model"], r["seed"]) in done]


def _fmt_interval(values, fmt: str = "{:+.3f}") -> str:
    mean, low, high = _interval(values)
    return f"{fmt.format(mean)} [{fmt.format(low)}, {fmt.format(high)}]"


def _setting_line(raw: list, args) -> str:
    """The setting the rows were measured in: recorded with them (runs since the two-sided rule), else the
    arguments (the full-size JSON predates the record)."""
    setting = raw[0].get("setting") if raw else None
    s = setting or {"dataset": args.dataset, "train_size": args.train_size, "test_size": args.test_size,
                    "epochs": args.epochs, "batch_size": args.batch_size, "value_dtype": args.value_dtype}
    train = f"{s['train_size']} training images" if s["train_size"] else "all of the training split"
    test = f"test split subsampled to {s['test_size']}" if s["test_size"] else "the whole test split"
    extra = ""
    if setting:
        extra = (f" Torch threads: {setting['threads']}; deterministic algorithms: {setting['deterministic']} (a seed "
                 "reproduces bitwise on the same thread count).")
    return (f"Data: {s['dataset']}, {train} ({test}, halved: validation / reported test). Protocol: {s['epochs']} "
            f"epochs, batch {s['batch_size']}, Adam at the model's rate; updates recorded in {s['value_dtype']}." + extra)


def _report(raw: list, args, ratios) -> str:
    all_points = _points(raw)
    seeds = sorted({r["seed"] for r in raw})
    sizes = sorted({r["size"] for r in raw})
    loads = [r["load_start"] for r in raw if "load_start" in r]
    t = scipy_stats.t.ppf(0.5 + CONFIDENCE / 2, len(seeds) - 1) if len(seeds) > 1 else float("nan")
    lines = [f"# The amnesiac regime: {args.title}", "",
             f"Machine: {describe_machine()}; load average when each (model, seed) started: "
             f"{f'{min(loads):.1f}–{max(loads):.1f}' if loads else 'not recorded'}. " + _setting_line(raw, args) +
             f" Dense and top-k records at r ∈ {ratios}. Forget sets of {sizes} samples, nested, drawn per seed; "
             f"seeds {seeds}.", "",
             "**The rule (two-sided, per seed).** A (size, method) cell is *within* in a seed when the row forgot — "
             f"its FA and its SVC-MIA figure are each within a margin of Retrain's — **and** its TA is within "
             f"{TA_POINTS * 100:.0f} points of Retrain's, either way. Margin at a size of n forget samples: "
             f"{MARGIN_SE:g} × √(max(p(1 − p), {MIN_VARIANCE:g}) / n), p = Retrain's seed-mean FA (resp. SVC-MIA "
             "member fraction) there: twice the binomial standard error, the seed-to-seed spread a Retrain's figure "
             "has from drawing n forget samples alone (the measured spread of Retrain's FA is printed beside it). A "
             "seed is *unmeasurable* when the original (no unlearning) is itself within the forgetting margins there. "
             f"Per cell: seeds within, and the mean with its {CONFIDENCE:.0%} t-interval (mean ± {t:.2f} · sd / √"
             f"{len(seeds)}) of TA − Retrain, FA − Retrain and SVC MIA − Retrain. The cell call: *outside* when one "
             "interval lies wholly outside ±its margin; *unmeasurable* when the original's FA and MIA intervals lie "
             "wholly inside (no unlearning would pass); *within* when all three intervals lie inside and the "
             "original's do not; else *inconclusive* (an interval straddles a boundary: more seeds would decide it).",
             "",
             "TA on the reported test half; SVC MIA: fraction of D_f the shadow SVC calls member; LR-MIA: loss-LR attack "
             f"accuracy minus Retrain's (absent below 10 forget samples); MIA figures on fewer than 50 forget samples "
             f"are unreliable ({results.UNRELIABLE}). RTE: Retrain's seconds / the method's. Repair rows: the undo, then "
             "`repair=True` (one epoch of the training recipe on D_r, forget accuracy checked before every step, kept "
             "at the most-repaired state with FA ≤ the forgetting target, the original's validation accuracy). Seconds "
             "are wall time on a shared 2-core machine.", ""]
    for model, points in all_points.items():
        lines += [f"## {model}", "",
                  "| forget samples | method | " + " | ".join(h for h, _, _ in COLUMNS[:4]) + " | " +
                  " | ".join(f"{h} [{CONFIDENCE:.0%} CI]" for h, _ in INTERVALS) + " | " +
                  " | ".join(h for h, _, _ in COLUMNS[4:]) + " | seeds within | cell |",
                  "|" + "---|" * (len(COLUMNS) + len(INTERVALS) + 4)]
        for size, margins, originals, calls in _cells(points):
            retrain = points[size]["retrain"]
            mark = results.UNRELIABLE if size < 50 else ""
            spread = statistics.stdev(p["FA"] for p in retrain) if len(retrain) > 1 else 0.0
            lines.append(f"| {size} | *margins* | | | | FA ± {margins['dFA']:.3f} (Retrain's FA sd {spread:.3f}) | "
                         f"± {TA_POINTS:.3f} | ± {margins['dFA']:.3f} | ± {margins['dMIA']:.3f}{mark} |" + " |" * 5)
            for name in sorted(points[size], key=_method_order):
                ps = points[size][name]
                cells = [_mean_std([p[k] for p in ps], f) for _, k, f in COLUMNS[:4]]
                cells += ["" if name == "retrain" else _fmt_interval([p[k] for p in ps]) + (mark if k == "dMIA" else "")
                          for _, k in INTERVALS]
                cells += [_mean_std([p[k] for p in ps], f) + (mark if k == "dLR" and mark and name != "retrain" else "")
                          for _, k, f in COLUMNS[4:]]
                if name in calls:
                    _, seed_calls, call = calls[name]
                    unmeasurable = seed_calls.count("unmeasurable")
                    counted = f"{seed_calls.count('within')}/{len(ps)}" + (f" ({unmeasurable} unmeasurable)"
                                                                           if unmeasurable else "")
                    tail = f"{counted} | **{call}**"
                else:
                    tail = " | "
                lines.append(f"| {size} | {name} | " + " | ".join(cells) + f" | {tail} |")
        lines += ["", _regime_statement(model, points), ""]
    training = {(r["model"], r["seed"]): r["rows"]["original"]["seconds"] for r in raw}
    lines += ["Training with every recorder (dense and each r), per (model, seed): " +
              ", ".join(f"{m} seed {s}: {v / 60:.1f} min" for (m, s), v in sorted(training.items())), ""]
    _plot(all_points, args.out + ".png")
    return "\n".join(lines) + "\n"


def _arguments(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--leaking", action="store_true",
                   help="the demo's setting, where the original leaks (module docstring); other flags override it")
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--models", help=f"default: {FULL['models']} ({LEAKING['models']} with --leaking)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--sizes", help=f"forget-set sizes, nested (default: {FULL['sizes']}; {LEAKING['sizes']} with --leaking)")
    p.add_argument("--keep-ratios", help=f"default: {FULL['keep_ratios']} ({LEAKING['keep_ratios']} with --leaking)")
    p.add_argument("--train-size", type=int, help="0: the whole training split (default; 3000 with --leaking)")
    p.add_argument("--test-size", type=int, help="0: the whole test split (default; 2000 with --leaking)")
    p.add_argument("--epochs", type=int, help="default 8 (40 with --leaking)")
    p.add_argument("--batch-size", type=int, help="default 128 (8 with --leaking)")
    p.add_argument("--value-dtype", choices=["float32", "float16", "bfloat16"],
                   help="of the recorded updates (default float32; float16 with --leaking)")
    p.add_argument("--repair", action=argparse.BooleanOptionalAction,
                   help="add the undo + calibrated repair rows (default: only with --leaking)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads (0: torch's default); recorded, since a seed reproduces bitwise only "
                        "on the same count")
    p.add_argument("--store-dir", default="/tmp/unlearn_ext_regime_stores",
                   help="one per concurrent run: it is emptied at the start of each (model, seed)")
    p.add_argument("--out", default="benchmarks/results/amnesiac_regime")
    p.add_argument("--title", help="the report's title (default: says which setting)")
    p.add_argument("--resume", action="store_true",
                   help="keep the complete (model, seed) runs already in <out>.json and run only the others")
    p.add_argument("--report", metavar="JSON[,JSON...]",
                   help="train nothing: write <out>.md/.png from the raw rows of these files (runs split over processes)")
    args = p.parse_args(argv)
    for key, value in (LEAKING if args.leaking else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.title is None:
        args.title = ("the leaking setting (the demo's: the original memorises and leaks membership)" if args.leaking
                      else "the full-size setting (the original hardly memorises: a map of damage more than of "
                           "forgetting)")
    for name, value in (("--train-size", args.train_size), ("--test-size", args.test_size)):
        if value < 0:
            p.error(f"{name} must be >= 0 (0: the whole split), got {value}")
    if args.threads < 0:
        p.error(f"--threads must be >= 0 (0: torch's default), got {args.threads}")
    for name, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size)):
        if value < 1:
            p.error(f"{name} must be >= 1, got {value}")
    try:
        args.seed_list = [int(s) for s in args.seeds.split(",")]
        args.size_list = [int(s) for s in args.sizes.split(",")]
        args.ratio_list = [float(r) for r in args.keep_ratios.split(",")]
    except ValueError as e:
        p.error(f"--seeds, --sizes and --keep-ratios are comma-separated numbers: {e}")
    if min(args.size_list) < 1:
        p.error(f"--sizes must be positive forget-set sizes, got {args.sizes}")
    if not all(0 < r <= 1 for r in args.ratio_list):
        p.error(f"--keep-ratios must lie in (0, 1], got {args.keep_ratios}")
    return args


def main(argv=None) -> int:
    args = _arguments(argv)
    sizes, ratios = args.size_list, args.ratio_list
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.report:
        raw = []
        for f in args.report.split(","):
            if not os.path.exists(f):
                raise SystemExit(f"amnesiac_regime.py: --report: no such file {f}")
            raw += json.loads(open(f).read())
        raw = _complete(raw, sizes)
        if not raw:
            raise SystemExit(f"amnesiac_regime.py: --report: no (model, seed) run in {args.report} reached every "
                             f"size of --sizes {args.sizes}")
    else:
        raw = _complete(json.loads(open(args.out + ".json").read()), sizes) if args.resume and os.path.exists(
            args.out + ".json") else []
        for model in args.models.split(","):
            for seed in args.seed_list:
                if any((r["model"], r["seed"]) == (model, seed) for r in raw):
                    continue
                _run_seed(args, model, seed, sizes, ratios, raw)
    text = _report(raw, args, ratios)
    results.write_text(text, args.out + ".md")
    results.write_text(json.dumps(raw, indent=1, default=repr), args.out + ".json")
    print(text)
    return 0


def _run_seed(args, model: str, seed: int, sizes: list, ratios: list, raw: list) -> None:
    """Train one original with every recorder, then every nested forget set; rows appended to ``raw`` and
    written to ``<out>.json`` after each size (so a crash keeps what was measured). Deterministic algorithms
    are on for the seed (``ExperimentConfig.deterministic``, as ``Experiment.run_once`` does)."""
    cfg = ExperimentConfig(dataset=args.dataset, model=model, methods=["retrain", "amnesiac", "partial_amnesiac"],
                           train_size=args.train_size or None, test_size=args.test_size or None, epochs=args.epochs,
                           batch_size=args.batch_size, keep_ratios=ratios, seed=seed, store_dir=args.store_dir,
                           keep_stores=False, value_dtype=args.value_dtype)
    setting = {"dataset": args.dataset, "train_size": args.train_size, "test_size": args.test_size,
               "epochs": args.epochs, "batch_size": args.batch_size, "value_dtype": args.value_dtype,
               "threads": torch.get_num_threads(), "deterministic": cfg.deterministic}
    load = os.getloadavg()[0]
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(cfg.deterministic or was_deterministic)
    exp = Experiment(cfg)
    try:
        exp.train(progress=False)
        print(f"{model} seed {seed}: trained in {exp.train_seconds / 60:.1f} min", file=sys.stderr, flush=True)
        order = torch.randperm(len(exp.data.train), generator=torch.Generator().manual_seed(1000 + seed))
        for n in sizes:
            ids = exp.data.train.ids[order[:n]].sort().values
            rows = _variant_rows(exp, ids, args.repair)
            undone = rows["amnesiac (no fine-tune)"]["stats"]["fraction_steps_affected"]
            raw.append({"model": model, "seed": seed, "size": n, "undone": undone, "load_start": load,
                        "setting": setting, "rows": rows})
            print(f"{model} seed {seed} size {n}: {undone:.1%} undone, TA retrain {rows['retrain']['TA']:.3f}, "
                  f"FA retrain {rows['retrain']['FA']:.3f} original {rows['original']['FA']:.3f}; load "
                  f"{os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
            results.write_text(json.dumps(raw, indent=1, default=repr), args.out + ".json")
    finally:
        exp.close()  # removes the stores it wrote (and the folder, if that leaves it empty), nothing else
        torch.use_deterministic_algorithms(was_deterministic)


if __name__ == "__main__":
    sys.exit(main())
