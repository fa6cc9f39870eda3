"""Command line: ``unlearn-ext demo`` (the main job), ``unlearn-ext run`` (any configuration), the deletion
workflow ``unlearn-ext train`` / ``forget`` / ``requests`` (:mod:`.deletion.commands`), ``unlearn-ext bench``
(the kernel benchmarks) and ``unlearn-ext plan`` (a recording's size, before training).

Every argument is checked before any work starts: a bad one, or two that contradict each other, prints one
error line (after argparse's usage line) and exits with status 2. The output folder (one per seed with several)
and the store folder are locked (:class:`.durable.FolderLock`) from before the data is loaded until the run
ends: a second run on a folder a live run holds is refused at once the same way, so it never replaces that
run's results or deletes its temporary stores (a folder the run created that holds nothing else at the end is
removed again, so a refused run leaves none behind).

results.json and chart.png are written atomically: a write that fails (a full disk) leaves an earlier file as it
was, prints one line saying so and what was written, and exits with status 1 (as does any other OSError of the
run, e.g. a store on a full disk). A chart that cannot be drawn is a one-line warning: results.json is kept, an
earlier run's chart.png beside it is removed, and the exit status stays 0. Ctrl-C prints one line that says what
was written (seeds already finished keep their files; the seed that was running gets none, or its results.json
without the chart when it was drawing) and exits with 130.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional, Tuple

from .argtypes import positive_float, positive_int, seed, size, unit_interval
from .durable import LOCK_NAME, FolderInUse, FolderLock
from .record.identity import VALUE_DTYPE_BY_NAME
from .experiment import (DEMO_METHODS, Experiment, ExperimentConfig, demo_config,
                         reads_keep_ratio, validate_config)


def _list(item):
    """A comma-separated list of at least one value, each given once."""
    def parse(text: str) -> list:
        values = [item(x) for x in text.split(",") if x.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of at least one value, got {text!r}")
        twice = [v for i, v in enumerate(values) if v in values[:i]]
        if twice:
            raise argparse.ArgumentTypeError(f"{twice[0]} given twice")
        return values
    return parse


class _Given(argparse.Action):
    """Stores the value and notes that the option was given (its default cannot tell): an option that another
    one overrides is refused only when given."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.given = {*namespace.given, self.dest}


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
    p.set_defaults(given=frozenset())
    p.add_argument("--forget-ratio", type=unit_interval(True), default=defaults.forget_ratio, action=_Given,
                   help="random forget set: this fraction of the training set (not with --forget-class)")
    p.add_argument("--forget-class", type=int, default=None, help="forget one whole class instead")
    p.add_argument("--train-size", type=size, default=defaults.train_size, help="0: the whole training split")
    p.add_argument("--test-size", type=size, default=defaults.test_size,
                   help="0: the whole test split (halved into validation and reported test)")
    p.add_argument("--keep-ratio", type=unit_interval(False), default=defaults.keep_ratio, action=_Given,
                   help="r of the partial methods (not with --keep-ratios)")
    p.add_argument("--keep-ratios", type=_list(unit_interval(False)), default=None, metavar="R1,R2,...",
                   help="a sweep of r: one row per r for every partial method (e.g. 0.01,0.05,0.1,0.2,0.5)")
    p.add_argument("--epochs", type=positive_int, default=defaults.epochs, help="training epochs")
    p.add_argument("--batch-size", type=positive_int, default=defaults.batch_size, help="training batch size")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="training learning rate (default: the model's, as in the paper)")
    p.add_argument("--seeds", type=_list(seed), default=[defaults.seed], metavar="S1,S2,...",
                   help="one run per seed, each in [0, 2**32) (data subsample, forget set, initialisation, shuffles)")
    p.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=defaults.deterministic,
                   help="bitwise-reproducible runs on the CPU for a given thread count (default: on)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default: torch's); results depend on it, results.json records it")
    p.add_argument("--no-calibrate", action="store_true",
                   help="run every method at its plain defaults, without running it to the forgetting target")
    p.add_argument("--value-dtype", default=defaults.value_dtype, choices=sorted(VALUE_DTYPE_BY_NAME),
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
                            lr=args.lr, seed=seed, deterministic=args.deterministic, threads=args.threads,
                            calibrate=not args.no_calibrate, value_dtype=args.value_dtype,
                            store_dir=args.store_dir or out_stores, keep_stores=args.store_dir is not None,
                            method_hparams=args.hparams)


def _check_combinations(args) -> None:
    """An option that another one given overrides, or that no selected method reads, is refused (it would
    be dropped without a word, or recorded in results.json while no row used it)."""
    for option, value in (("--out", args.out), ("--store-dir", args.store_dir)):
        if value is not None and not value.strip():
            raise ValueError(f"{option}: expected a folder, got {value!r}")
    if args.forget_class is not None and "forget_ratio" in args.given:
        raise ValueError("--forget-class and --forget-ratio: give one (a whole class, or a random fraction)")
    if args.keep_ratios is not None and "keep_ratio" in args.given:
        raise ValueError("--keep-ratio and --keep-ratios: give one (a single r, or a sweep with a row per r)")
    option = "--keep-ratios" if args.keep_ratios is not None else "--keep-ratio" if "keep_ratio" in args.given \
        else None
    if option and not any(reads_keep_ratio(m) for m in args.methods):
        from .methods import available_methods

        readers = [m for m in available_methods() if reads_keep_ratio(m)]
        raise ValueError(f"{option}: no selected method reads r (selected: {', '.join(args.methods)}; r is read "
                         f"by {', '.join(readers)})")


def _result_folders(out: str, seeds) -> List[str]:
    return [out] if len(seeds) == 1 else [os.path.join(out, f"seed{s}") for s in seeds]


def _check_folder(what: str, folder: str) -> None:
    """``folder`` must be a folder, or one that can be created: its nearest existing ancestor writable."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"{what}: {folder} exists and is not a folder")
    parent = folder
    while not os.path.exists(parent):
        parent = os.path.dirname(os.path.abspath(parent))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise ValueError(f"{what}: cannot create or write {folder} ({parent} is not a writable folder)")


def _check_out(folder: str) -> None:
    """An output folder must be usable (:func:`_check_folder`), and its result files no folders."""
    for name in ("results.json", "chart.png"):
        if os.path.isdir(os.path.join(folder, name)):
            raise ValueError(f"--out: {os.path.join(folder, name)} is a folder, where the results file goes")
    _check_folder("--out", folder)


def _remove_empty_folders(folder: str, top: str) -> None:
    """Remove ``folder`` and the folders above it up to ``top``, while each is empty."""
    path, top = os.path.abspath(folder), os.path.abspath(top)
    while True:
        try:
            os.rmdir(path)
        except OSError:
            return  # not empty (or gone): the folders above it stay too
        if path == top:
            return
        path = os.path.dirname(path)


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())


class _Outputs:
    """What a run holds and has written on disk: the folders it writes into, each locked from before the data is
    loaded until the run ends, and the files written so far, so that its last line says truthfully what is there
    when it stops early."""

    def __init__(self, command: str):
        self.command = command
        self.doing = "checking the arguments"
        self.written: List[str] = []
        self._held: List[Tuple[FolderLock, Optional[str], bool]] = []  # (lock, topmost folder it created, temporary)

    def lock(self, folder: str, what: str, temporary: bool = False) -> None:
        """Lock ``folder``, creating it; ``what`` names it in messages. A live run holding it raises
        :class:`FolderInUse`; a folder that cannot be created or written, ``ValueError``. ``temporary``: the
        folder goes at the end if nothing but the lock is left in it, whoever created it."""
        if any(os.path.realpath(lock.folder) == os.path.realpath(folder) for lock, _, _ in self._held):
            return  # the same folder under two names (--store-dir equal to --out)
        created, existing = None, os.path.abspath(folder)
        while not os.path.exists(existing):
            created, existing = existing, os.path.dirname(existing)
        lock = FolderLock(folder, what)
        try:
            lock.acquire()
        except OSError as e:  # a read-only file system, no permission, a full disk
            if created:
                _remove_empty_folders(folder, created)
            raise ValueError(f"{what}: cannot create or write {folder} ({e.strerror or e})") from None
        self._held.append((lock, created, temporary))

    def release(self) -> None:
        """Release every lock, the last taken first. A folder this run created (or a temporary one) that holds
        nothing but its lock file is removed, with the folders above it this run created: a refused run
        leaves no folder behind, and the demo's store folder goes with its stores."""
        while self._held:
            lock, created, temporary = self._held.pop()
            try:
                empty = bool(created or temporary) and os.listdir(lock.folder) == [LOCK_NAME]
                if empty:
                    os.remove(lock.path)  # while held: a run that opened it meanwhile was refused
            except OSError:
                empty = False  # someone removed it, or it cannot be listed: leave it
            lock.release()
            if empty:
                _remove_empty_folders(lock.folder, created or lock.folder)

    def stopped(self, how: str, why: str = "") -> str:
        """The run's last line when it stops early: ``how`` it stopped, while doing what, and what it wrote."""
        wrote = f"wrote {', '.join(self.written)}" if self.written else "no results written"
        return f"unlearn-ext {self.command}: {how} while {self.doing}{': ' + why if why else ''}; {wrote}"


def _prepare(args, out: str, outputs: _Outputs) -> list:
    """Every check before any work: the combination of options, the configurations of all seeds and the
    output and store folders; then, holding the folders' locks, the data and the forget set of the first seed
    (the others differ only in the draw). Returns one Experiment per seed, the first with its data loaded."""
    _check_combinations(args)
    configs = [_config(args, seed, out) for seed in args.seeds]
    for cfg in configs:
        validate_config(cfg)
    folders = _result_folders(out, args.seeds)
    for folder in folders:
        _check_out(folder)
    store_dir = configs[0].store_dir
    store_what = "--store-dir" if args.store_dir else "--out (its temporary stores)"
    if store_dir:
        _check_folder(store_what, store_dir)
    for folder in dict.fromkeys([out] + folders):
        outputs.lock(folder, "--out")
    if store_dir:
        outputs.lock(store_dir, store_what, temporary=args.store_dir is None)
    outputs.doing = "loading the data"
    first = Experiment(configs[0])
    first.forget_ids()
    return [first] + configs[1:]


def _chart(results, result: dict, path: str, command: str) -> bool:
    """Draw the chart; whether it was drawn. When it is not, an earlier run's chart.png there is removed (it
    would sit beside this run's results.json): a failure is a one-line warning, Ctrl-C goes on up."""
    try:
        results.chart(result, path)
        return True
    except BaseException as e:
        if os.path.exists(path):
            os.remove(path)
        if not isinstance(e, Exception):
            raise
        print(f"unlearn-ext {command}: warning: {path} not drawn ({_one_line(e)}); the results.json beside it is "
              "complete", file=sys.stderr)
        return False


def _experiments(todo: list, out: str, progress: bool, outputs: _Outputs) -> int:
    from . import results

    for item in todo:
        seed = (item.cfg if isinstance(item, Experiment) else item).seed
        outputs.doing = f"running seed {seed} (nothing written for it)"
        exp = item if isinstance(item, Experiment) else Experiment(item)
        result = exp.run_once(progress)
        folder = out if len(todo) == 1 else os.path.join(out, f"seed{seed}")
        print(results.summary(result))
        print(results.table(result))
        print(results.leakage(result))
        json_path, chart_path = os.path.join(folder, "results.json"), os.path.join(folder, "chart.png")
        earlier = "an earlier one there is unchanged" if os.path.exists(json_path) else "not written"
        outputs.doing = f"writing {json_path} ({earlier})"
        results.write_json(result, json_path)
        outputs.written.append(json_path)
        outputs.doing = f"drawing {chart_path} (not written)"
        if _chart(results, result, chart_path, outputs.command):
            outputs.written.append(chart_path)
            print(f"wrote {json_path} and {chart_path}")
        else:
            print(f"wrote {json_path} (no chart)")
    return 0


#: Commands with a parser of their own: name → (module, function, help).
DELEGATED = {
    "train": (".deletion.commands", "train_main", "train a registry model with its updates recorded, ready for "
              "deletion requests (unlearn-ext train --help)"),
    "forget": (".deletion.commands", "forget_main", "serve one deletion request on a checkpoint: each recorded step "
               "undone once across the log, on the record (exit 0 served, 2 bad input, 3 refused by the guard)"),
    "requests": (".deletion.commands", "requests_main", "the history of a request log, one row per request"),
    "bench": (".bench", "main", "kernel benchmarks: each op against the plain-PyTorch way, in the same run "
              "(unlearn-ext bench --help for its options)"),
    "plan": (".plan", "main", "bytes a recording will take, before training: dense, partial, only-ids "
             "(unlearn-ext plan --help for its options)"),
}


def _delegate(command: str, rest) -> int:
    import importlib

    module, function, _ = DELEGATED[command]
    return getattr(importlib.import_module(module, __package__), function)(rest, prog=f"unlearn-ext {command}")


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
    for name, (_, _, text) in DELEGATED.items():
        sub.add_parser(name, help=text, add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command in DELEGATED:
        return _delegate(args.command, rest)
    command = commands[args.command]
    if rest:
        command.error(f"unrecognised arguments: {' '.join(rest)}")
    out = args.out or ("runs/demo" if args.command == "demo" else "runs/run")
    outputs = _Outputs(args.command)
    try:
        try:
            todo = _prepare(args, out, outputs)
        except (ValueError, FileNotFoundError, FileExistsError, FolderInUse) as e:
            command.error(str(e))
        return _experiments(todo, out, not args.no_progress, outputs)
    except KeyboardInterrupt:
        print(outputs.stopped("interrupted"), file=sys.stderr)
        return 130
    except OSError as e:  # a full disk, a file that cannot be written: said in one line with what is there
        print(outputs.stopped("failed", _one_line(e)), file=sys.stderr)
        return 1
    finally:
        outputs.release()

if __name__ == "__main__":
    sys.exit(main())
