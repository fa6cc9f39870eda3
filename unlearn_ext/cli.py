"""Command line: ``unlearn-ext demo`` (the main job), ``unlearn-ext run`` (any configuration) and
``unlearn-ext bench`` (the kernel benchmarks)."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .experiment import DEMO_METHODS, ExperimentConfig, demo_config, run_experiment


def _methods(text: str):
    from .methods import available_methods

    return available_methods() if text == "all" else [m for m in text.split(",") if m]


def _add_experiment_args(p: argparse.ArgumentParser, defaults: ExperimentConfig) -> None:
    p.add_argument("--dataset", default=defaults.dataset,
                   help="auto | digits | fashion_mnist | mnist | cifar10 | svhn | organamnist")
    p.add_argument("--root", default=defaults.root, help="data root for user-supplied data sets")
    p.add_argument("--model", default=defaults.model)
    p.add_argument("--methods", type=_methods, default=defaults.methods,
                   help="comma-separated method names, or 'all'")
    p.add_argument("--forget-ratio", type=float, default=defaults.forget_ratio)
    p.add_argument("--forget-class", type=int, default=None, help="forget one whole class instead")
    p.add_argument("--train-size", type=int, default=defaults.train_size, help="0: the whole training split")
    p.add_argument("--test-size", type=int, default=defaults.test_size, help="0: the whole test split")
    p.add_argument("--keep-ratio", type=float, default=defaults.keep_ratio)
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[defaults.seed])
    p.add_argument("--deterministic", action="store_true")
    p.add_argument("--hparams", type=json.loads, default={},
                   help='per-method hyper-parameters as JSON, e.g. \'{"partial_optimization": {"epochs": 3}}\'')
    p.add_argument("--out", default=None, help="output folder for results.json and chart.png")
    p.add_argument("--no-progress", action="store_true")


def _config(args, seed: int) -> ExperimentConfig:
    return ExperimentConfig(dataset=args.dataset, root=args.root, model=args.model, methods=args.methods,
                            forget_ratio=args.forget_ratio, forget_class=args.forget_class,
                            train_size=args.train_size or None, test_size=args.test_size or None,
                            keep_ratio=args.keep_ratio, epochs=args.epochs, batch_size=args.batch_size,
                            lr=args.lr, seed=seed, deterministic=args.deterministic,
                            method_hparams=args.hparams)


def _experiments(args, out_default: str) -> int:
    from . import results

    out = args.out or out_default
    for seed in args.seeds:
        result = run_experiment(_config(args, seed), progress=not args.no_progress)
        folder = out if len(args.seeds) == 1 else os.path.join(out, f"seed{seed}")
        os.makedirs(folder, exist_ok=True)
        print(results.summary(result))
        print(results.table(result))
        print(results.leakage(result))
        results.write_json(result, os.path.join(folder, "results.json"))
        results.chart(result, os.path.join(folder, "chart.png"))
        print(f"wrote {os.path.join(folder, 'results.json')} and {os.path.join(folder, 'chart.png')}")
    return 0


def _bench(rest) -> int:
    from .bench import main as bench_main

    return bench_main(rest, prog="unlearn-ext bench")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="unlearn-ext", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the main job: every paper method + baselines on the default data")
    _add_experiment_args(demo, demo_config())
    run = sub.add_parser("run", help="any configuration of data set, model, methods and forget set")
    _add_experiment_args(run, ExperimentConfig(methods=list(DEMO_METHODS)))
    sub.add_parser("bench", help="kernel benchmarks: each op against the plain-PyTorch way, in the same run "
                                 "(unlearn-ext bench --help for its options)", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        return _bench(rest)
    if rest:
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    return _experiments(args, "runs/demo" if args.command == "demo" else "runs/run")


if __name__ == "__main__":
    sys.exit(main())
