"""The paper's tables: data set × model × method, mean ± std over seeds, under the protocol of docs/protocol.md.

    python benchmarks/reproduce_paper.py --datasets digits,fashion_mnist --models mlp,lenet,resnet9 \
        --seeds 0,1,2 --out benchmarks/results/paper_tables.md
    # naive vs partial at equal forgetting over the paper's r sweep (Algorithms 2 and 3):
    python benchmarks/reproduce_paper.py --datasets fashion_mnist --models mlp,lenet --train-size 0 \
        --test-size 0 --methods retrain,label_flip,partial_label_flip,optimization,partial_optimization \
        --keep-ratios 0.01,0.05,0.1,0.2,0.5 --out benchmarks/results/equal_forgetting.md

Each (data set, model, seed) is one :func:`unlearn_ext.experiment.run_experiment` with the paper's protocol
(8 epochs, batch 128, Adam at the model's learning rate by default): every method at its own defaults, the
methods with a strength knob run to the forgetting target (the original's accuracy on the validation half of
the test split; chance for a whole class), TA on the other half. Each row gives how many seeds met the target,
the steps used, and its flags ("no forgetting": FA did not move; the row is not to be ranked). Data sets whose
files are missing are listed as skipped with the reason.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys

from unlearn_ext import available_methods, results
from unlearn_ext.experiment import DEMO_METHODS, ExperimentConfig, run_experiment
from unlearn_ext.machine import describe_machine
from unlearn_ext.protocol import mia_reliable
from unlearn_ext.record.identity import VALUE_DTYPE_BY_NAME

METRICS = [("RA", "RA"), ("FA", "FA"), ("TA", "TA"), ("MIA", "MIA"), ("LR-MIA", "LR_MIA"), ("Avg.Gap", "avg_gap"),
           ("seconds", "seconds")]


def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return ""
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {std:.3f}" if abs(mean) < 100 else f"{mean:.0f} ± {std:.0f}"


def _forgetting(rows) -> str:
    """Target met in how many seeds, mean steps of the kept runs, the learning rates kept, and every flag."""
    verdicts = [r.get("verdict") for r in rows]
    if not all(verdicts):
        return ""
    met = sum(v["met"] for v in verdicts)
    cells = [f"met {met}/{len(rows)}"]
    cals = [r.get("calibration") for r in rows]
    if all(cals):
        kept = [c["tries"][c["chosen"]] for c in cals]
        cells.append(f"{statistics.fmean(k['steps'] or 0 for k in kept):.0f} steps")
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="digits,fashion_mnist")
    p.add_argument("--models", default="mlp,lenet,resnet9")
    p.add_argument("--methods", default=",".join(DEMO_METHODS), help="comma-separated names, or 'all'")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--forget-ratio", type=float, default=0.01)
    p.add_argument("--forget-class", type=int, default=None)
    p.add_argument("--keep-ratios", default="0.1", help="r of the partial methods; several: one row per r")
    p.add_argument("--train-size", type=int, default=6000, help="0: the whole training split")
    p.add_argument("--test-size", type=int, default=2000, help="0: the whole test split")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--no-calibrate", action="store_true")
    p.add_argument("--store-dir", default=None,
                   help="DiskStores here instead of memory (large models); removed after each seed")
    p.add_argument("--value-dtype", default="float32", choices=list(VALUE_DTYPE_BY_NAME),
                   help="of the recorded updates")
    p.add_argument("--root", default=None)
    p.add_argument("--out", default="benchmarks/results/paper_tables.md")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = available_methods() if args.methods == "all" else args.methods.split(",")
    ratios = [float(r) for r in args.keep_ratios.split(",")]
    forget = (f"whole class {args.forget_class}" if args.forget_class is not None
              else f"random forget set of {args.forget_ratio:.2%}")
    out = [f"# Reproduction tables ({datetime.date.today()})", "",
           f"Machine: {describe_machine()}. Protocol: {args.epochs} epochs, batch "
           f"{args.batch_size}, Adam at the model's rate; {forget}; training split "
           f"{'whole' if not args.train_size else f'subsampled to {args.train_size}'}, test split "
           f"{'whole' if not args.test_size else f'subsampled to {args.test_size}'} and halved into validation and "
           f"reported test; updates recorded in {args.value_dtype}; keep ratio(s) {ratios}; mean ± std over seeds "
           f"{seeds}. Every method at its own defaults; "
           + ("no calibration." if args.no_calibrate else
              "methods with a stopping knob run to the forgetting target (FA ≤ the original's validation accuracy; "
              "chance for a class) within 250 steps per learning rate of the grid ×1, ×3, ×10, ×30, on validation "
              "data only.") +
           " forgetting: seeds that met the target, mean steps and the learning rates kept; 'no forgetting' = FA "
           "did not move (not to be ranked). LR-MIA: loss-LR attack accuracy (0.5 = indiscernible); MIA: fraction "
           "of the forget set the shadow SVC (confidence feature) calls member (compare with Retrain). "
           f"Load average at start: {os.getloadavg()[0]:.1f} (seconds are wall time, inflated on a shared machine).",
           ""]
    for ds in args.datasets.split(","):
        for model in args.models.split(","):
            runs = []
            try:
                for seed in seeds:
                    cfg = ExperimentConfig(dataset=ds, root=args.root, model=model, methods=methods,
                                           forget_ratio=args.forget_ratio, forget_class=args.forget_class,
                                           train_size=args.train_size or None, test_size=args.test_size or None,
                                           keep_ratios=ratios, epochs=args.epochs, batch_size=args.batch_size,
                                           calibrate=not args.no_calibrate, store_dir=args.store_dir,
                                           keep_stores=False, value_dtype=args.value_dtype, seed=seed)
                    runs.append(run_experiment(cfg, progress=False))
                    print(f"done {ds}/{model}/seed {seed}", file=sys.stderr, flush=True)
            except (FileNotFoundError, ValueError) as e:
                out += [f"## {ds} / {model}: skipped", "", f"{type(e).__name__}: {e}", ""]
                continue
            r0 = runs[0]
            targets = ", ".join(f"{r['forgetting_target']['value']:.3f}" for r in runs)
            out += [f"## {r0['dataset']} / {model}", "",
                    f"Source: {r0['dataset_source']}. Sizes: {r0['sizes']}. Steps holding a forget sample: "
                    f"{r0['fraction_of_steps_with_forget']:.1%}. Forgetting target per seed: {targets} "
                    f"({r0['forgetting_target']['basis']}).", "", table(runs), ""]
            results.write_text("\n".join(out) + "\n", args.out)  # after each pair: partial tables survive an interrupt
    out.append(f"Load average at end: {os.getloadavg()[0]:.1f}.")
    results.write_text("\n".join(out) + "\n", args.out)
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
