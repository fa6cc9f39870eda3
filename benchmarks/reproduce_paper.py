"""The paper's tables: data set × model × method, mean ± std over seeds, for every data set present.

    python benchmarks/reproduce_paper.py --datasets digits,fashion_mnist --models mlp,lenet,resnet9 \
        --seeds 0,1,2 --out benchmarks/results/paper_tables.md

Each (data set, model, seed) is one :func:`unlearn_ext.experiment.run_experiment` with the paper's
protocol (8 epochs, batch 128, Adam at the model's learning rate). Data sets whose files are missing are
listed as skipped with the reason. ``--train-size`` subsamples the training split to keep CPU runs short
(the tables say which size was used).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys

import torch

from unlearn_ext import available_methods, build_info, results
from unlearn_ext.experiment import DEMO_METHODS, ExperimentConfig, run_experiment

METRICS = [("RA", "RA"), ("FA", "FA"), ("TA", "TA"), ("MIA", "MIA"), ("LR-MIA", "LR_MIA"), ("Avg.Gap", "avg_gap"),
           ("seconds", "seconds")]


def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return ""
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {std:.3f}" if abs(mean) < 100 else f"{mean:.0f} ± {std:.0f}"


def table(runs) -> str:
    """One markdown table for a (data set, model) pair from its runs over seeds."""
    names = list(runs[0]["rows"])
    lines = ["| method | " + " | ".join(h for h, _ in METRICS) + " | storage (MB) |",
             "|" + "---|" * (len(METRICS) + 2)]
    for name in names:
        notes = sorted({r["rows"][name].get("skipped") or r["rows"][name].get("diverged", "") for r in runs} - {""})
        if notes:  # a method that did not apply (no conv layers) or diverged in some seed
            lines.append(f"| {name} | " + "; ".join(notes) + " |" + " |" * len(METRICS))
            continue
        cells = [_mean_std([results.metric(r["rows"][name], k) for r in runs]) for _, k in METRICS]
        cells.append(results.storage_cell(runs[0]["rows"][name]))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="digits,fashion_mnist")
    p.add_argument("--models", default="mlp,lenet,resnet9")
    p.add_argument("--methods", default=",".join(DEMO_METHODS), help="comma-separated names, or 'all'")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--forget-ratio", type=float, default=0.01)
    p.add_argument("--train-size", type=int, default=6000)
    p.add_argument("--test-size", type=int, default=2000)
    p.add_argument("--root", default=None)
    p.add_argument("--out", default="benchmarks/results/paper_tables.md")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = available_methods() if args.methods == "all" else args.methods.split(",")
    out = [f"# Reproduction tables ({datetime.date.today()})", "",
           f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch "
           f"{torch.__version__}; backend {build_info()['backend']}. Protocol: 8 epochs, batch 128, Adam; "
           f"random forget set of {args.forget_ratio:.0%}; training split subsampled to {args.train_size} "
           f"(test {args.test_size}); mean ± std over seeds {seeds}. LR-MIA: loss-LR attack accuracy "
           "(0.5 = indiscernible); MIA: fraction of the forget set the shadow SVC (confidence feature) calls member. "
           f"Load average at start: {os.getloadavg()[0]:.1f} (seconds are wall time, inflated on a shared machine).",
           ""]
    for ds in args.datasets.split(","):
        for model in args.models.split(","):
            runs = []
            try:
                for seed in seeds:
                    cfg = ExperimentConfig(dataset=ds, root=args.root, model=model, methods=methods,
                                           forget_ratio=args.forget_ratio, train_size=args.train_size,
                                           test_size=args.test_size, seed=seed)
                    runs.append(run_experiment(cfg, progress=False))
                    print(f"done {ds}/{model}/seed {seed}", file=sys.stderr, flush=True)
            except (FileNotFoundError, ValueError) as e:
                out += [f"## {ds} / {model}: skipped", "", f"{type(e).__name__}: {e}", ""]
                continue
            r0 = runs[0]
            out += [f"## {r0['dataset']} / {model}", "",
                    f"Source: {r0['dataset_source']}. Sizes: {r0['sizes']}. Steps holding a forget sample: "
                    f"{r0['fraction_of_steps_with_forget']:.1%}.", "", table(runs), ""]
            results.write_text("\n".join(out) + "\n", args.out)  # after each pair: partial tables survive an interrupt
    results.write_text("\n".join(out) + "\n", args.out)
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
