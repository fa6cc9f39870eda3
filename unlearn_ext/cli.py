"""Command line: ``unlearn-ext demo`` (the main job), ``unlearn-ext run`` (any configuration) and
``unlearn-ext bench`` (the kernel benchmarks).

Every argument is checked before any work starts: a bad one prints one error line (after argparse's usage
line) and exits with status 2; Ctrl-C prints one line and exits with 130, writing no results for the seed that
was running (seeds already finished keep theirs).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

from .experiment import DEMO_METHODS, VALUE_DTYPES, Experiment, ExperimentConfig, demo_config, validate_config


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0 (0: all of it), got {text!r}") from None
    if value < 0 or value == 1:
        raise argparse.ArgumentTypeError(f"expected 0 (all of it) or an integer >= 2, got {value}")
    return value


def _unit_interval(open_right: bool):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (0.0 < value < 1.0 if open_right else 0.0 < value <= 1.0):
            raise argparse.ArgumentTypeError(f"expected a number in (0, 1{')' if open_right else ']'}, got {text!r}")
        return value
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _list(item):
    def parse(text: str) -> list:
        return [item(x) for x in text.split(",") if x.strip()]
    return parse


def _methods(text: str):
    from .methods import available_methods

    names = available_methods() if text == "all" else [m for m in text.split(",") if m]
    unknown = sorted(set(names) - set(available_methods()))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown or [text]}; choose from 'all' or "
                                         f"{', '.join(available_methods())}")
    return names


def _hparams(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e})") from None
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise argparse.ArgumentTypeError('expected a JSON object of objects, e.g. \'{"msg": {"epochs": 2}}\'')
    return value


def _add_experiment_args(p: argparse.ArgumentParser, defaults: ExperimentConfig) -> None:
    from . import data, models

    p.add_argument("--dataset", default=defaults.dataset, choices=["auto"] + data.available_datasets(),
                   help="auto: Fashion-MNIST when installed, else scikit-learn's digits")
    p.add_argument("--root", default=defaults.root, help="data root for user-supplied data sets")
    p.add_argument("--model", default=defaults.model, choices=models.available_models(),
                   help="the network (the paper's MNIST family: mlp, lenet, resnet9)")
    p.add_argument("--methods", type=_methods, default=defaults.methods, metavar="NAMES",
                   help="comma-separated method names, or 'all'")
    p.add_argument("--forget-ratio", type=_unit_interval(True), default=defaults.forget_ratio,
                   help="random forget set: this fraction of the training set")
    p.add_argument("--forget-class", type=int, default=None, help="forget one whole class instead")
    p.add_argument("--train-size", type=_size, default=defaults.train_size, help="0: the whole training split")
    p.add_argument("--test-size", type=_size, default=defaults.test_size,
                   help="0: the whole test split (halved into validation and reported test)")
    p.add_argument("--keep-ratio", type=_unit_interval(False), default=defaults.keep_ratio,
                   help="r of the partial methods")
    p.add_argument("--keep-ratios", type=_list(_unit_interval(False)), default=None, metavar="R1,R2,...",
                   help="a sweep of r: one row per r for every partial method (e.g. 0.01,0.05,0.1,0.2,0.5)")
    p.add_argument("--epochs", type=_positive_int, default=defaults.epochs, help="training epochs")
    p.add_argument("--batch-size", type=_positive_int, default=defaults.batch_size, help="training batch size")
    p.add_argument("--lr", type=_positive_float, default=None,
                   help="training learning rate (default: the model's, as in the paper)")
    p.add_argument("--seeds", type=_list(int), default=[defaults.seed], metavar="S1,S2,...",
                   help="one run per seed (data subsample, forget set, initialisation, shuffles)")
    p.add_argument("--deterministic", action="store_true", help="bitwise-reproducible runs on the CPU")
    p.add_argument("--no-calibrate", action="store_true",
                   help="run every method at its plain defaults, without running it to the forgetting target")
    p.add_argument("--value-dtype", default=defaults.value_dtype, choices=sorted(VALUE_DTYPES),
                   help="dtype of the recorded updates")
    p.add_argument("--store-dir", default=None, help="keep the recorded update stores as files here "
                   "(default: in memory for run; temporary files under the output folder for demo)")
    p.add_argument("--hparams", type=_hparams, default={}, metavar="JSON",
                   help='per-method hyper-parameters, e.g. \'{"partial_optimization": {"epochs": 3}}\'')
    p.add_argument("--out", default=None, help="output folder for results.json and chart.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _config(args, seed: int, out: str = "") -> ExperimentConfig:
    """The configuration of one seed. The demo records into temporary DiskStores under ``<out>/stores`` (its
    dense record would hold gigabytes of memory) unless ``--store-dir`` keeps them elsewhere; ``run`` records
    in memory unless ``--store-dir`` is given."""
    out_stores = os.path.join(out, "stores") if args.command == "demo" else None
    return ExperimentConfig(dataset=args.dataset, root=args.root, model=args.model, methods=args.methods,
                            forget_ratio=None if args.forget_class is not None else args.forget_ratio,
                            forget_class=args.forget_class, train_size=args.train_size or None,
                            test_size=args.test_size or None, keep_ratio=args.keep_ratio,
                            keep_ratios=args.keep_ratios, epochs=args.epochs, batch_size=args.batch_size,
                            lr=args.lr, seed=seed, deterministic=args.deterministic,
                            calibrate=not args.no_calibrate, value_dtype=args.value_dtype,
                            store_dir=args.store_dir or out_stores, keep_stores=args.store_dir is not None,
                            method_hparams=args.hparams)


def _check_out(out: str, seeds) -> None:
    """The output folder (and one per seed) must be creatable and writable before any work starts."""
    folders = [out] if len(seeds) == 1 else [os.path.join(out, f"seed{s}") for s in seeds]
    for folder in folders:
        for path in [folder, os.path.join(folder, "results.json"), os.path.join(folder, "chart.png")]:
            if path != folder and os.path.isdir(path):
                raise ValueError(f"--out: {path} is a folder, where the results file goes")
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise ValueError(f"--out: {folder} exists and is not a folder")
        parent = folder
        while not os.path.exists(parent):
            parent = os.path.dirname(os.path.abspath(parent))
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
            raise ValueError(f"--out: cannot create or write {folder} ({parent} is not a writable folder)")


def _prepare(args, out: str) -> list:
    """Every check before any work: the configurations of all seeds, the output folders, the data and the
    forget set (of the first seed; the others differ only in the draw). Returns one Experiment per seed, the
    first with its data loaded."""
    configs = [_config(args, seed, out) for seed in args.seeds]
    for cfg in configs:
        validate_config(cfg)
    _check_out(out, args.seeds)
    first = Experiment(configs[0])
    first.forget_ids()
    return [first] + configs[1:]


def _experiments(todo: list, out: str, progress: bool) -> int:
    from . import results

    for item in todo:
        exp = item if isinstance(item, Experiment) else Experiment(item)
        result = exp.run_once(progress)
        folder = out if len(todo) == 1 else os.path.join(out, f"seed{exp.cfg.seed}")
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


def _plan(rest) -> int:
    from .plan import main as plan_main

    return plan_main(rest, prog="unlearn-ext plan")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="unlearn-ext", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter
    commands = {"demo": sub.add_parser("demo", formatter_class=fmt,
                                       help="the main job: every paper method + baselines on the default data"),
                "run": sub.add_parser("run", formatter_class=fmt,
                                      help="any configuration of data set, model, methods and forget set")}
    _add_experiment_args(commands["demo"], demo_config())
    _add_experiment_args(commands["run"], ExperimentConfig(methods=list(DEMO_METHODS)))
    sub.add_parser("bench", help="kernel benchmarks: each op against the plain-PyTorch way, in the same run "
                                 "(unlearn-ext bench --help for its options)", add_help=False)
    sub.add_parser("plan", help="bytes a recording will take, before training: dense, partial, only-ids "
                                "(unlearn-ext plan --help for its options)", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        return _bench(rest)
    if args.command == "plan":
        return _plan(rest)
    command = commands[args.command]
    if rest:
        command.error(f"unrecognised arguments: {' '.join(rest)}")
    out = args.out or ("runs/demo" if args.command == "demo" else "runs/run")
    try:
        todo = _prepare(args, out)
    except (ValueError, FileNotFoundError) as e:
        command.error(str(e))
    try:
        return _experiments(todo, out, progress=not args.no_progress)
    except FileExistsError as e:  # a kept store of an earlier run at a path this run records to (before training)
        command.error(str(e))
    except KeyboardInterrupt:
        print(f"unlearn-ext {args.command}: interrupted; no results written for the seed that was running",
              file=sys.stderr)
        return 130

if __name__ == "__main__":
    sys.exit(main())
