"""The paper's tables: data set × model × method, mean ± std over seeds, under the protocol of docs/protocol.md.

    python benchmarks/reproduce_paper.py --datasets digits,fashion_mnist --models mlp,lenet,resnet9 \
        --seeds 0,1,2 --out benchmarks/results/paper_tables.md
    # naive vs partial at equal forgetting over the paper's r sweep (Algorithms 2 and 3):
    python benchmarks/reproduce_paper.py --datasets fashion_mnist --models mlp,lenet --train-size 0 \
        --test-size 0 --methods retrain,label_flip,partial_label_flip,optimization,partial_optimization \
        --keep-ratios 0.01,0.05,0.1,0.2,0.5 --out benchmarks/results/equal_forgetting.md
    # every method on the demo's setting; seed 0 is exactly what `unlearn-ext demo` prints (same threads):
    python benchmarks/reproduce_paper.py --setting demo --methods all \
        --out benchmarks/results/paper_tables_demo_setting_all_methods.md
    # the markdown again from the raw data, measuring nothing:
    python benchmarks/reproduce_paper.py --report benchmarks/results/equal_forgetting.json --out /tmp/t.md

Each (data set, model, seed) is one :func:`unlearn_ext.experiment.run_experiment` with the paper's protocol
(8 epochs, batch 128, Adam at the model's learning rate by default; ``--setting demo`` starts from
``unlearn-ext demo``'s configuration instead, and any option given overrides it): every method at its own
defaults, the methods with a strength knob run to the forgetting target (the original's accuracy on the
validation half of the test split; chance for a whole class), TA on the other half. Runs are deterministic
(``torch.use_deterministic_algorithms``), so a seed reproduces on the same thread count.

Writes ``<out>.json`` — every run's result dict (config as used, environment with threads and load, every row
of every seed with its calibration tries, verdict flags and weight digest), the command, machine and git commit —
after each seed, then ``<out>`` (markdown) from that JSON alone (``--report`` does only the second step). Each
row gives how many seeds met the target, the steps and seconds of every calibration try (the kept try's beside),
and its flags ("no forgetting": FA did not move; the row is not to be ranked). Data sets whose files are missing
are listed as skipped with the reason.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import sys

from unlearn_ext import available_methods, raw_record, results
from unlearn_ext.experiment import ExperimentConfig, demo_config, run_experiment
from unlearn_ext.machine import describe_commit, describe_machine, git_commit
from unlearn_ext.protocol import LR_GRID, STEP_BUDGET, mia_reliable
from unlearn_ext.record.identity import VALUE_DTYPE_BY_NAME

METRICS = [("RA", "RA"), ("FA", "FA"), ("TA", "TA"), ("MIA", "MIA"), ("LR-MIA", "LR_MIA"), ("Avg.Gap", "avg_gap"),
           ("seconds (all tries)", "seconds"), ("RTE (all tries)", "rte")]
HARNESS = "benchmarks/reproduce_paper.py"
#: Data sets and models of each setting when --datasets/--models are not given.
SETTING_PAIRS = {"paper": ("digits,fashion_mnist", "mlp,lenet,resnet9"), "demo": ("auto", "lenet")}


def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return ""
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {std:.3f}" if abs(mean) < 100 else f"{mean:.0f} ± {std:.0f}"


def _forgetting(rows) -> str:
    """Target met in how many seeds, mean steps over every calibration try (and of the kept try), the learning
    rates kept, and every flag."""
    verdicts = [r.get("verdict") for r in rows]
    if not all(verdicts):
        return ""
    met = sum(v["met"] for v in verdicts)
    cells = [f"met {met}/{len(rows)}"]
    cals = [r.get("calibration") for r in rows]
    if all(cals):
        kept = [c["tries"][c["chosen"]] for c in cals]
        tries = [len(c["tries"]) for c in cals]
        cells.append(f"{statistics.fmean(c['steps_all_tries'] or 0 for c in cals):.0f} steps over "
                     f"{'/'.join(map(str, tries))} tries (kept try {statistics.fmean(k['steps'] or 0 for k in kept):.0f})")
        cells.append("lr " + "/".join(f"{k['lr']:.3g}" for k in kept))
    flags = sorted({v["flag"] for v in verdicts} - {""})
    return "; ".join(flags + cells)


def table(runs) -> str:
    """One markdown table for a (data set, model) pair from its runs over seeds."""
    names = list(runs[0]["rows"])
    lines = ["| method | " + " | ".join(h for h, _ in METRICS) + " | forgetting | storage (MB) |",
             "|" + "---|" * (len(METRICS) + 3)]
    unreliable = False
    for name in names:
        rows = [r["rows"][name] for r in runs]
        notes = sorted({row.get("skipped") or row.get("diverged", "") for row in rows} - {""})
        if notes:  # a method that did not apply (no conv layers) or diverged in some seed
            lines.append(f"| {name} | " + "; ".join(notes) + " |" + " |" * (len(METRICS) + 1))
            continue
        mark = "" if all(mia_reliable(row) for row in rows) else results.UNRELIABLE
        unreliable |= bool(mark)
        cells = [_mean_std([results.metric(row, k) for row in rows]) + (mark if k in results.MIA_KEYS else "")
                 for _, k in METRICS]
        cells += [_forgetting(rows), results.storage_cell(rows[0])]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if unreliable:
        lines += ["", f"{results.UNRELIABLE} unreliable: fewer than 50 members per attack group."]
    return "\n".join(lines)


def _split(size) -> str:
    return "whole" if not size else f"subsampled to {size}"


def _protocol(cfg: dict, seeds) -> str:
    forget = (f"whole class {cfg['forget_class']}" if cfg["forget_class"] is not None
              else f"random forget set of {cfg['forget_ratio']:.2%}")
    ratios = cfg["keep_ratios"] or [cfg["keep_ratio"]]
    rate = "the model's rate" if cfg["lr"] is None else f"{cfg['lr']:g}"
    grid = ", ".join(f"×{f:g}" for f in LR_GRID)
    calibration = ("no calibration." if not cfg["calibrate"] else
                   "methods with a stopping knob run to the forgetting target (FA ≤ the original's validation "
                   f"accuracy; chance for a class) within {STEP_BUDGET} steps per learning rate of the grid {grid}, "
                   "on validation data only.")
    kernels = "deterministic" if cfg["deterministic"] else "non-deterministic"
    return (f"{cfg['epochs']} epochs, batch {cfg['batch_size']}, Adam at {rate}; {forget}; training split "
            f"{_split(cfg['train_size'])}, test split {_split(cfg['test_size'])} and halved into validation and "
            f"reported test; updates recorded in {cfg['value_dtype']}; keep ratio(s) {ratios}; {kernels} kernels; "
            f"mean ± std over seeds {seeds}. Every method at its own defaults; {calibration}")


def report(raw: dict) -> str:
    """The markdown of a run, from its JSON alone."""
    pairs = [p for p in raw["pairs"] if p.get("runs") or p.get("skipped")]
    done = [p for p in pairs if p.get("runs")]
    first = done[0]["runs"][0] if done else None
    threads = sorted({r["environment"]["torch_threads"] for p in done for r in p["runs"]})
    out = [f"# Reproduction tables ({raw['started_at'][:10]})", "",
           f"Generated by `{raw['command']}` ({describe_commit(raw.get('commit'))}); "
           f"markdown from `{raw['json_name']}` by `--report`.", "",
           f"Machine: {raw['machine']}; torch threads {threads}. Load average at start {raw['load_start']:.1f}"
           + (f", at end {raw['load_end']:.1f}" if raw.get("load_end") is not None else " (run not finished)")
           + " (seconds are wall time, inflated on a shared machine)."
           + (f" Joined from {len(raw['parts'])} processes run side by side (`--report` of their JSONs)."
              if raw.get("parts") else "")]
    if first is not None:
        seeds = sorted({r["config"]["seed"] for p in done for r in p["runs"]})
        out += ["", "Protocol: " + _protocol(first["config"], seeds) +
                " forgetting: seeds that met the target, mean optimizer steps over every calibration try (a "
                "try that missed the target ran too; the kept try's mean beside) and the learning rates kept; "
                "seconds and RTE (Retrain's seconds / the method's) also count every try; 'no forgetting' = FA "
                "did not move (not to be ranked). LR-MIA: loss-LR attack accuracy (0.5 = indiscernible); MIA: "
                "fraction of the forget set the shadow SVC (confidence feature) calls member (compare with "
                "Retrain)."]
    out.append("")
    for p in pairs:
        if not p.get("runs"):
            out += [f"## {p['dataset']} / {p['model']}: skipped", "", p["skipped"], ""]
            continue
        runs, r0 = p["runs"], p["runs"][0]
        targets = ", ".join(f"{r['forgetting_target']['value']:.3f}" for r in runs)
        out += [f"## {r0['dataset']} / {p['model']}", "",
                f"Source: {r0['dataset_source']}. Sizes: {r0['sizes']}. Steps holding a forget sample: "
                f"{r0['fraction_of_steps_with_forget']:.1%}. Forgetting target per seed: {targets} "
                f"({r0['forgetting_target']['basis']}).", "", table(runs), ""]
    return "\n".join(out) + "\n"


def _seed_config(args, base: ExperimentConfig, dataset: str, model: str, seed: int) -> ExperimentConfig:
    """``base`` (the setting) with every option the command line gave."""
    given = {k: v for k, v in dict(
        forget_ratio=args.forget_ratio, forget_class=args.forget_class, epochs=args.epochs,
        batch_size=args.batch_size, value_dtype=args.value_dtype, root=args.root, threads=args.threads).items()
        if v is not None}
    for name in ("train_size", "test_size"):
        if getattr(args, name) is not None:
            given[name] = getattr(args, name) or None  # 0: the whole split
    if args.keep_ratios is not None:
        ratios = [float(r) for r in args.keep_ratios.split(",")]
        given.update(keep_ratio=ratios[0], keep_ratios=ratios if len(ratios) > 1 else None)
    if given.get("forget_class") is not None:
        given["forget_ratio"] = None
    methods = available_methods() if args.methods == "all" else args.methods.split(",")
    return dataclasses.replace(base, dataset=dataset, model=model, methods=methods, seed=seed,
                               calibrate=base.calibrate and not args.no_calibrate,
                               store_dir=args.store_dir, keep_stores=False, **given)


def _joined(parser, records, page: str) -> dict:
    """One raw record of runs made by several processes (a seed each): their runs per (data set, model), by
    seed; each process's command, commit and load kept under ``parts``."""
    joined = dict(records[0], command=" ; ".join(r["command"] for r in records),
                  json_name=os.path.basename(raw_record.json_beside(page)),
                  load_start=max(r["load_start"] for r in records),
                  load_end=None if any(r["load_end"] is None for r in records) else max(r["load_end"] for r in records),
                  parts=[{k: r[k] for k in ("command", "started_at", "commit", "load_start", "load_end")}
                         for r in records])
    pairs = {}
    for record in records:
        for pair in record["pairs"]:
            into = pairs.setdefault((pair["dataset"], pair["model"]), dict(pair, runs=[]))
            into["runs"] += pair["runs"]
    for (ds, model), pair in pairs.items():
        seeds = [r["config"]["seed"] for r in pair["runs"]]
        if len(set(seeds)) < len(seeds):
            parser.error(f"--report: {ds}/{model} seed(s) {sorted({s for s in seeds if seeds.count(s) > 1})} "
                         "appear in more than one file")
        pair["runs"].sort(key=lambda r: r["config"]["seed"])
    joined["pairs"] = list(pairs.values())
    return joined


def _arguments(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", choices=sorted(SETTING_PAIRS), default="paper",
                   help="the configuration the options below change: the paper's protocol, or the demo's")
    p.add_argument("--datasets", default=None, help="default: digits,fashion_mnist (paper); auto (demo)")
    p.add_argument("--models", default=None, help="default: mlp,lenet,resnet9 (paper); lenet (demo)")
    p.add_argument("--methods", default=",".join(ExperimentConfig().methods), help="comma-separated names, or 'all'")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--forget-ratio", type=float, default=None)
    p.add_argument("--forget-class", type=int, default=None)
    p.add_argument("--keep-ratios", default=None, help="r of the partial methods; several: one row per r")
    p.add_argument("--train-size", type=int, default=None, help="0: the whole training split")
    p.add_argument("--test-size", type=int, default=None, help="0: the whole test split")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's); recorded")
    p.add_argument("--no-calibrate", action="store_true")
    p.add_argument("--store-dir", default=None,
                   help="DiskStores here instead of memory (large models); removed after each seed")
    p.add_argument("--value-dtype", default=None, choices=list(VALUE_DTYPE_BY_NAME), help="of the recorded updates")
    p.add_argument("--root", default=None)
    p.add_argument("--out", default=None, help="the page (.md; default benchmarks/results/paper_tables.md, or "
                   "beside the --report JSON); the raw record goes beside it (.json)")
    p.add_argument("--resume", action="store_true",
                   help="keep the (data set, model, seed) runs already in the JSON and run only the others")
    p.add_argument("--report", metavar="JSON[,JSON...]",
                   help="measure nothing: write the page from this raw record (several: one page of their runs)")
    return p, p.parse_args(argv)


def main(argv=None) -> int:
    parser, args = _arguments(argv)
    page = raw_record.page_path(parser, args.out)
    if args.report and "," in args.report:  # one run per seed in parallel processes, joined
        records = [raw_record.read(parser, path, HARNESS) for path in args.report.split(",")]
        page = page or os.path.splitext(args.report.split(",")[0])[0] + ".md"
        print(raw_record.write_then_page(_joined(parser, records, page), page, report))
        return 0
    if args.report:
        print(raw_record.report(parser, args.report, HARNESS, report, page))
        return 0
    page = page or "benchmarks/results/paper_tables.md"
    base = demo_config() if args.setting == "demo" else ExperimentConfig()
    datasets, models = SETTING_PAIRS[args.setting]
    seeds = [int(s) for s in (args.seeds.split(","))]
    previous = {}
    if args.resume and os.path.exists(raw_record.json_beside(page)):
        with open(raw_record.json_beside(page)) as f:
            previous = {(p["dataset"], p["model"]): p for p in json.load(f)["pairs"]}
    command = "python benchmarks/reproduce_paper.py " + " ".join(sys.argv[1:] if argv is None else argv)
    raw = {"harness": HARNESS, "command": command, "json_name": os.path.basename(raw_record.json_beside(page)),
           "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": describe_machine(), "commit": git_commit(), "load_start": os.getloadavg()[0],
           "load_end": None, "args": vars(args), "pairs": []}
    for ds in (args.datasets or datasets).split(","):
        for model in (args.models or models).split(","):
            pair = {"dataset": ds, "model": model, "runs": [], "skipped": None}
            raw["pairs"].append(pair)
            kept = {r["config"]["seed"]: r for r in previous.get((ds, model), {}).get("runs", [])}
            try:
                for seed in seeds:
                    cfg = _seed_config(args, base, ds, model, seed)
                    pair["runs"].append(kept.get(seed) or run_experiment(cfg, progress=False))
                    print(f"done {ds}/{model}/seed {seed}", file=sys.stderr, flush=True)
                    # after each seed: an interrupted run keeps what it measured
                    raw_record.write_then_page(raw, page, report)
            except (FileNotFoundError, ValueError) as e:
                pair.update(runs=[], skipped=f"{type(e).__name__}: {e}")
    raw["load_end"] = os.getloadavg()[0]
    print(raw_record.write_then_page(raw, page, report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
