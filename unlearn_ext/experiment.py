"""One unlearning experiment end to end, under the evaluation protocol (docs/protocol.md, :mod:`.protocol`).

Load data; carve a fixed, seeded validation half out of the test split (TA and the attacks' non-members are
the other half); train the original model with the paper's protocol while recording dense and partial updates
for the store-reading methods; then, for a forget set, run each method on a copy of the original at its own
defaults (:func:`.protocol.method_hparams`), running the methods with a strength knob to the forgetting target
(:func:`.protocol.calibrated_run`), and evaluate every model beside the retrained one. Each row says whether it
met the target, whether it forgot at all, and whether its membership figures are reliable
(:func:`.protocol.forgetting_verdict`, :func:`.protocol.mia_reliable`).

:class:`Experiment` keeps the trained original so that several forget sets can be read against one training
run (``benchmarks/amnesiac_regime.py``); :func:`run_experiment` is one training and one forget set.
``unlearn-ext demo``/``run`` and ``benchmarks/reproduce_paper.py`` are thin shells around them.
"""
from __future__ import annotations

import copy
import hashlib
import math
import numbers
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from tqdm.auto import tqdm

from . import __version__, build_info, data, metrics, models
from .methods import available_methods, get_method, unlearn
from .protocol import (ForgettingTarget, calibrated_run, forgetting_target, forgetting_verdict, method_hparams,
                       supports_calibration, validation_split)
from .argtypes import SEED_LIMIT
from .durable import FolderLock
from .machine import machine_facts
from .record import DiskStore
from .record.identity import VALUE_DTYPE_BY_NAME
from .train import TrainConfig, kernels, train

PAPER_METHODS = ["amnesiac", "partial_amnesiac", "label_flip", "partial_label_flip", "optimization",
                 "partial_optimization"]
DEMO_METHODS = ["retrain", "finetune"] + PAPER_METHODS + ["ng_plus", "msg", "ct"]
#: The paper's sweep of the keep ratio r (docs/algorithms.md#the-papers-training-protocol).
PAPER_KEEP_RATIOS = (0.01, 0.05, 0.1, 0.2, 0.5)
#: The loss-LR attack's folds: a forget set or test half smaller than this cannot be scored at all.
MIN_FORGET = 10


@dataclass
class ExperimentConfig:
    """Every knob of one experiment; stored in results.json as used (the sizes, the forget set's kind and the
    keep ratios the rows read: a value no row used is recorded as None)."""

    dataset: str = "auto"  # "auto": Fashion-MNIST when installed, else scikit-learn digits
    root: Optional[str] = None
    model: str = "lenet"
    methods: List[str] = field(default_factory=lambda: list(DEMO_METHODS))
    forget_ratio: Optional[float] = 0.01
    forget_class: Optional[int] = None  # forget this whole class instead (takes precedence over forget_ratio)
    train_size: Optional[int] = 6000  # seeded subsample of the training split (None: all of it)
    test_size: Optional[int] = 2000  # of the test split, before halving into validation and reported test
    keep_ratio: float = 0.1  # r of the partial methods
    keep_ratios: Optional[List[float]] = None  # a sweep: one row per r for every partial method (None: [keep_ratio])
    epochs: int = 8
    batch_size: int = 128
    lr: Optional[float] = None  # None: the model's recommended learning rate
    seed: int = 0
    deterministic: bool = True  # bitwise-reproducible on the CPU for a given thread count (recorded)
    threads: Optional[int] = None  # torch's CPU threads while it runs (None: torch's default); results depend on it
    calibrate: bool = True  # run methods with a strength knob to the forgetting target
    value_dtype: str = "float32"  # of the recorded updates
    store_dir: Optional[str] = None  # DiskStore files there; None: in memory
    keep_stores: bool = True  # False: the DiskStore files are removed when the experiment closes
    method_hparams: dict = field(default_factory=dict)  # {method: {hparam: value}}

    def ratios(self) -> List[float]:
        return list(self.keep_ratios) if self.keep_ratios else [self.keep_ratio]


#: ``unlearn-ext demo``'s setting. Every number is what the demo needs for its rows to mean something;
#: see README "Set up and run" for what it measured.
#:
#: * 3,000 Fashion-MNIST training images at batch 8 with a 50-image forget set: a forget sample sits in 12.6 %
#:   of the steps (1 − (1 − 50/3000)^8) instead of 72 % at batch 128, and each attack has 50 members (fewer
#:   make the MIA columns unreliable). At 12.6 % partial amnesiac r = 0.1 forgets but loses about 12 TA points
#:   (benchmarks/results/amnesiac_regime_leaking.md, this setting), and the demo's row shows that cost;
#: * LeNet for 40 epochs (15,000 steps) with the paper's Adam at 1e-3, so the original memorises its training set
#:   and leaks membership against Retrain;
#: * updates recorded in float16: the dense record of 15,000 steps would be 6.5 GB as float32 deltas and is 2.0 GB
#:   (float16 values, exact zeros dropped); partial r = 0.1 writes 0.53 GB.
DEMO = dict(train_size=3000, test_size=2000, batch_size=8, epochs=40, forget_ratio=50 / 3000,
            value_dtype="float16")


def demo_config() -> ExperimentConfig:
    """The demo's defaults: :class:`ExperimentConfig` with :data:`DEMO`."""
    return ExperimentConfig(**DEMO)


def fraction_of_steps_with_forget(forget_fraction: float, batch_size: int) -> float:
    """With a random forget set of f·|D| samples and batch B, a fraction 1 − (1 − f)^B of all steps
    holds a forget sample — the steps amnesiac unlearning must undo."""
    return 1.0 - (1.0 - forget_fraction) ** batch_size


def _environment() -> dict:
    import numpy
    import sklearn

    facts = machine_facts()
    return {"unlearn_ext": __version__, "torch": facts["torch"], "numpy": numpy.__version__,
            "sklearn": sklearn.__version__, "python": facts["python"], "machine": facts["arch"],
            "cpus": facts["cpu_count"], "cpu": facts["Model name"], "torch_threads": facts["torch_threads"],
            "load_average_at_start": os.getloadavg()[0], "build": build_info()}


def reads_keep_ratio(method: str) -> bool:
    """Whether a method's rows depend on the keep ratio r: r of its optimizer (it declares
    ``takes_run_keep_ratio``: the paper's partial methods) or of its recording (partial amnesiac)."""
    cls = get_method(method)
    return cls.takes_run_keep_ratio or cls.record_keep_ratio is not None


def ratio_tag(r: float) -> str:
    """How a keep ratio appears in row names (``"<method> r=<tag>"``) and store file names."""
    return f"{r:g}"


def _weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer's bytes: two runs agree bitwise iff their digests agree."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- checks

def _positive_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _ratio(name: str, value, upper_open: bool) -> None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and \
        0.0 < value and (value < 1.0 if upper_open else value <= 1.0)
    if not ok:
        raise ValueError(f"{name} must be a number in (0, 1{')' if upper_open else ']'}, got {value!r}")


def _twice(values) -> list:
    """The values that occur more than once."""
    return sorted({v for v in values if list(values).count(v) > 1})


def validate_config(cfg: ExperimentConfig) -> None:
    """Every check that needs no data, before any work starts: method names (each once), per-method
    hyper-parameters (names, and that the method accepts them; a partial method's keep_ratio is the
    configuration's), numeric ranges, the seed, keep ratios that name distinct rows and stores, the model name,
    the value dtype, and that a kept ``store_dir`` holds no store at a path this run records to. A bad value
    raises ``ValueError`` naming the field; an existing kept store ``FileExistsError`` naming its path."""
    unknown = sorted(set(cfg.methods) - set(available_methods()))
    if unknown:
        raise ValueError(f"methods: unknown method(s) {unknown}; available: {available_methods()}")
    if not cfg.methods:
        raise ValueError("methods: no method selected")
    if _twice(cfg.methods):
        raise ValueError(f"methods: {_twice(cfg.methods)} selected twice (one row and one store each)")
    if not isinstance(cfg.method_hparams, dict) or not all(isinstance(v, dict) for v in cfg.method_hparams.values()):
        raise ValueError("method_hparams must map method names to {hyper-parameter: value} objects, got "
                         f"{cfg.method_hparams!r}")
    stray = sorted(set(cfg.method_hparams) - set(cfg.methods))
    if stray:
        raise ValueError(f"method_hparams: {stray} name no selected method (selected: {cfg.methods})")
    for name, hp in cfg.method_hparams.items():
        get_method(name)(**hp)  # unknown hyper-parameter names raise here, naming the method
        if get_method(name).takes_run_keep_ratio and "keep_ratio" in hp:  # results.json would record another r
            raise ValueError(f"method_hparams: the keep_ratio of {name} is the configuration's keep_ratio (or "
                             "keep_ratios, a row per r); set it there")
    for name in ("epochs", "batch_size"):
        _positive_int(name, getattr(cfg, name))
    if cfg.threads is not None:
        _positive_int("threads", cfg.threads)
    for name in ("train_size", "test_size"):
        if getattr(cfg, name) is not None:
            _positive_int(name, getattr(cfg, name), minimum=2)
    if cfg.forget_class is not None:  # a whole class; it takes precedence over forget_ratio
        _positive_int("forget_class", cfg.forget_class, minimum=0)
    else:
        _ratio("forget_ratio", cfg.forget_ratio, upper_open=True)
    for r in cfg.ratios():
        _ratio("keep_ratio", r, upper_open=False)
    tags = [ratio_tag(r) for r in cfg.ratios()]
    if _twice(tags):
        raise ValueError(f"keep_ratios: {cfg.keep_ratios} name the row and store r={_twice(tags)[0]} more than once")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, numbers.Integral) or not 0 <= cfg.seed < SEED_LIMIT:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {cfg.seed!r}")
    if cfg.lr is not None and not (isinstance(cfg.lr, numbers.Real) and math.isfinite(cfg.lr) and cfg.lr > 0):
        raise ValueError(f"lr must be a positive number, got {cfg.lr!r}")
    models.recommended_lr(cfg.model)  # unknown model names raise, listing the known ones
    if cfg.value_dtype not in VALUE_DTYPE_BY_NAME:
        raise ValueError(f"value_dtype must be one of {sorted(VALUE_DTYPE_BY_NAME)}, got {cfg.value_dtype!r}")
    if cfg.keep_stores:
        for key in store_keys(cfg):
            _refuse_kept_store(store_path(cfg, *key))


def store_keys(cfg: ExperimentConfig) -> List[Tuple[str, Optional[float]]]:
    """(method, keep ratio) of every store the selected methods read: dense for naive amnesiac, one per r of
    the sweep for partial amnesiac."""
    keys = []
    for m in cfg.methods:
        cls = get_method(m)
        if cls.needs_store:
            keys += [(m, None)] if cls.record_keep_ratio is None else [(m, r) for r in cfg.ratios()]
    return keys


def store_path(cfg: ExperimentConfig, method: str, ratio: Optional[float]) -> Optional[str]:
    """The file of one store under ``cfg.store_dir`` (None: stores in memory)."""
    if cfg.store_dir is None:
        return None
    tag = "dense" if ratio is None else f"r{ratio_tag(ratio)}"
    return os.path.join(cfg.store_dir, f"{method}-{tag}-seed{cfg.seed}.ulx")


def _refuse_kept_store(path: Optional[str]) -> None:
    if path is not None and os.path.exists(path):  # DiskStore(path) would reopen it and append to another's steps
        raise FileExistsError(f"store_dir: {path} already exists (a store of an earlier run); a new recording is "
                              "never appended to it: remove it or choose another store_dir")


# ------------------------------------------------------------------------------------------ experiment

@dataclass
class _Data:
    splits: data.DataSplits
    train: data.IndexedTensorDataset
    validation: data.IndexedTensorDataset
    test: data.IndexedTensorDataset
    notes: List[str]


class Experiment:
    """The trained original of one configuration, read against any number of forget sets.

    ``Experiment(cfg)`` validates the configuration and loads the data (nothing is trained yet);
    :meth:`train` trains the original while recording one store per store-reading method and keep ratio;
    :meth:`forget_ids` draws the configured forget set; :meth:`run` unlearns a forget set with every method
    and returns the result dict (``results.json``).
    """

    def __init__(self, cfg: ExperimentConfig):
        validate_config(cfg)
        self.cfg = cfg
        self.data = self._load()
        self.model: Optional[torch.nn.Module] = None
        self.stores: Dict[Tuple[str, Optional[float]], object] = {}
        self._store_paths: List[str] = []
        self._store_lock: Optional[FolderLock] = None
        self.train_seconds = 0.0
        self.lr = cfg.lr if cfg.lr is not None else models.recommended_lr(cfg.model)
        self.train_config = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=self.lr, seed=cfg.seed)

    def _load(self) -> _Data:
        cfg = self.cfg
        sizes = dict(train_size=cfg.train_size, test_size=cfg.test_size, seed=cfg.seed)
        splits = data.default_dataset(cfg.root, **sizes) if cfg.dataset == "auto" else \
            data.load_dataset(cfg.dataset, cfg.root, **sizes)
        notes = []
        for name, ds in (("train_size", splits.train), ("test_size", splits.test)):
            asked = getattr(cfg, name)
            if asked is not None and asked > len(ds):
                notes.append(f"{name} {asked} asked for; {splits.name} has {len(ds)}: all of it used")
        if cfg.forget_class is not None and cfg.forget_class >= splits.num_classes:
            raise ValueError(f"forget_class must be in [0, {splits.num_classes}) for {splits.name}, "
                             f"got {cfg.forget_class}")
        validation, test = validation_split(splits.test, cfg.seed)
        if len(test) < MIN_FORGET:
            raise ValueError(f"test_size: the reported test half holds {len(test)} samples; the loss-LR attack "
                             f"needs at least {MIN_FORGET}")
        return _Data(splits, splits.train, validation, test, notes)

    # ---------------------------------------------------------------------------------------- forget set
    def forget_ids(self) -> torch.Tensor:
        """The configured forget set (a seeded random fraction, or a whole class), checked for size."""
        cfg = self.cfg
        ids = data.forget_ids(self.data.train, ratio=None if cfg.forget_class is not None else cfg.forget_ratio,
                              cls=cfg.forget_class, seed=cfg.seed)
        if ids.numel() < MIN_FORGET:
            raise ValueError(f"forget_ratio {cfg.forget_ratio} of {len(self.data.train)} training samples gives "
                             f"{ids.numel()} forget samples; the loss-LR attack needs at least {MIN_FORGET} "
                             f"(and 50 for a reliable figure): use forget_ratio >= "
                             f"{MIN_FORGET / len(self.data.train):.4g}")
        return ids

    # ------------------------------------------------------------------------------------------ training
    def _new_store(self, method: str, ratio: Optional[float]):
        path = store_path(self.cfg, method, ratio)
        if path is None:
            return None  # the recorder's default MemoryStore
        if self._store_lock is None:  # held until close(): no other run deletes or reopens this run's stores
            self._store_lock = FolderLock(self.cfg.store_dir, "store_dir", join=True).acquire()
        if self.cfg.keep_stores:
            _refuse_kept_store(path)  # again: one may have appeared since the configuration was checked
        elif os.path.exists(path):  # left by a dead run: a live one would hold the folder's lock
            warnings.warn(f"removing {path}: a temporary store an interrupted run left behind", RuntimeWarning)
            os.remove(path)
        self._store_paths.append(path)
        return DiskStore(path)

    def train(self, progress: bool = True) -> torch.nn.Module:
        """Train the original model with the configured recipe, recording every store the methods need."""
        with kernels(self.cfg.deterministic, self.cfg.threads):
            return self._train(progress)

    def _train(self, progress: bool) -> torch.nn.Module:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        model = self.model_factory()
        recorders = {}
        for method, ratio in store_keys(cfg):
            kw = {} if ratio is None else {"keep_ratio": ratio}
            recorders[(method, ratio)] = get_method(method).recorder(
                model, store=self._new_store(method, ratio), value_dtype=VALUE_DTYPE_BY_NAME[cfg.value_dtype], **kw)
        start = time.perf_counter()
        train(model, self._loader(self.data.train, 0), self.train_config, recorders=list(recorders.values()),
              progress="train original" if progress else None)
        self.train_seconds = time.perf_counter() - start
        self.stores = {k: rec.store for k, rec in recorders.items()}
        for s in self.stores.values():
            s.flush()
        self.model = model
        return model

    def model_factory(self) -> torch.nn.Module:
        splits = self.data.splits
        return models.make_model(self.cfg.model, splits.input_shape, splits.num_classes)

    def _loader(self, ds, offset: int):  # a fresh loader per use: each method sees the same seeded order
        return data.loader(ds, self.cfg.batch_size, shuffle=True, seed=self.cfg.seed + offset)

    def close(self) -> None:
        """Close the stores; without ``keep_stores``, remove the files they were written to. Releases the store
        folder's lock (a temporary store folder left holding nothing is removed)."""
        for s in self.stores.values():
            s.close()
        if not self.cfg.keep_stores:
            for path in self._store_paths:
                if os.path.exists(path):
                    os.remove(path)
            self._store_paths.clear()
        if self._store_lock is not None:
            self._store_lock.release(remove_empty_folder=not self.cfg.keep_stores)
            self._store_lock = None

    def run_once(self, progress: bool = True) -> dict:
        """Train, unlearn the configured forget set with every method, release the stores, and return the
        result dict (``results.json``): config (with the sizes used), environment, data sizes (train, forget,
        retain, validation, reported test), the forgetting target and one row per model — the original, then
        Retrain, then every other method — with :func:`metrics.evaluate`'s columns, seconds, the method's
        statistics and effective hyper-parameters, its calibration (tries, met; a calibrated row's seconds and
        RTE count every try, ``seconds_kept_try``/``rte_kept_try``/``steps_all_tries`` beside), its verdict
        (target met, forgot, equals the original), storage, RTE, the gap to Retrain and a digest of the final
        weights. ``cfg.deterministic`` (the default) turns on ``torch.use_deterministic_algorithms`` while
        :meth:`train` and :meth:`run` work (restored afterwards): with it, the same config on the same thread
        count gives bitwise-identical weights on the CPU."""
        try:
            ids = self.forget_ids()
            self.train(progress)
            return self.run(ids, progress)
        finally:
            self.close()

    # ------------------------------------------------------------------------------------------ unlearning
    def _rows_to_run(self) -> List[Tuple[str, str, Optional[float]]]:
        """(row name, method, keep ratio) for every row; Retrain first (the others are read against it); a
        partial method gets a row per r of a sweep, named ``"<method> r=<r>"``."""
        ratios = self.cfg.ratios()
        rows = []
        for m in sorted(self.cfg.methods, key=lambda m: m != "retrain"):
            if reads_keep_ratio(m) and len(ratios) > 1:
                rows += [(f"{m} r={ratio_tag(r)}", m, r) for r in ratios]
            else:
                rows.append((m, m, ratios[0] if reads_keep_ratio(m) else None))
        return rows

    def run(self, forget_ids: torch.Tensor, progress: bool = True, methods: Optional[List[str]] = None,
            forget_class: Optional[int] = None) -> dict:
        """Unlearn ``forget_ids`` from the trained original with every selected method (or ``methods``, a
        subset) and return the result dict (see :meth:`run_once` for its keys). ``forget_class``: the forget
        set is that whole class (the target is then chance); default: the configuration's. A forget set
        smaller than the loss-LR attack's :data:`MIN_FORGET` is evaluated without that attack."""
        if self.model is None:
            raise RuntimeError("Experiment.run: call train() first")
        with kernels(self.cfg.deterministic, self.cfg.threads):
            return self._run(forget_ids, progress, methods, forget_class)

    def _run(self, forget_ids, progress, methods, forget_class) -> dict:
        cfg, d, model = self.cfg, self.data, self.model
        forget_class = cfg.forget_class if forget_class is None else forget_class
        forget_ds, retain_ds = data.split_forget(d.train, forget_ids)
        evaluate_sets = dict(forget=data.loader(forget_ds, 512), retain=data.loader(retain_ds, 512),
                             test=data.loader(d.test, 512), lr_mia=len(forget_ds) >= MIN_FORGET)

        def evaluate(net):
            return metrics.evaluate(net, seed=cfg.seed, **evaluate_sets)

        target = forgetting_target(model, data.loader(d.validation, 512), forget_class, d.splits.num_classes)
        original = dict(evaluate(model), seconds=self.train_seconds, weights_sha256=_weights_digest(model),
                        validation_accuracy=metrics.accuracy(model, data.loader(d.validation, 512)))
        rows = {"original": original}
        facts = {"seed": cfg.seed, "num_classes": d.splits.num_classes, "model_factory": self.model_factory,
                 "train_config": self.train_config}
        forget_batches = math.ceil(len(forget_ds) / cfg.batch_size)
        todo = [r for r in self._rows_to_run() if methods is None or r[1] in methods]
        bar = tqdm(todo, desc="unlearning", leave=False, disable=not progress)
        for row_name, name, ratio in bar:
            bar.set_postfix_str(row_name)
            rows[row_name] = self._method_row(name, ratio, facts, forget_ds, retain_ds, target, forget_batches,
                                              evaluate, original)
        if "retrain" in rows:
            for name, row in rows.items():
                if "skipped" in row or "diverged" in row:
                    continue
                row["gap"] = metrics.gap_to(rows["retrain"], row)
                if name != "original":
                    row["rte"] = metrics.rte(rows["retrain"]["seconds"], row["seconds"])
                    if "seconds_kept_try" in row:
                        row["rte_kept_try"] = metrics.rte(rows["retrain"]["seconds"], row["seconds_kept_try"])
        config = asdict(cfg)  # with the sizes used: None where the whole split was (see "notes")
        config.update({k: None if getattr(cfg, k) is None or getattr(cfg, k) > len(ds) else len(ds)
                       for k, ds in (("train_size", d.train), ("test_size", d.splits.test))})
        config.update(_forget_and_keep_ratios_used(cfg, forget_class, [ratio for _, _, ratio in todo]))
        f = len(forget_ds) / len(d.train)
        return {"config": config, "environment": _environment(), "dataset": d.splits.name,
                "dataset_source": d.splits.source, "dataset_notes": d.splits.notes, "notes": d.notes,
                "sizes": {"train": len(d.train), "forget": len(forget_ds), "retain": len(retain_ds),
                          "validation": len(d.validation), "test": len(d.test)},
                "train_config": self.train_config.to_dict(),
                "forgetting_target": {"value": target.value, "basis": target.basis},
                "fraction_of_steps_with_forget": fraction_of_steps_with_forget(f, cfg.batch_size)
                if forget_class is None else 1.0,
                "rows": rows}

    def _method_row(self, name, ratio, facts, forget_ds, retain_ds, target: ForgettingTarget, forget_batches,
                    evaluate, original) -> dict:
        cfg, model = self.cfg, self.model
        cls = get_method(name)
        reason = cls.unsupported(model)
        if reason:  # e.g. MSG/CT on a model without conv layers: say so in the table, run the rest
            return {"skipped": reason}
        user = cfg.method_hparams.get(name, {})
        hp = method_hparams(cls, facts, self.lr, ratio if ratio is not None else cfg.keep_ratio, user)
        store = self.stores.get((name, ratio if cls.record_keep_ratio is not None else None))

        def run(hparams):
            net = copy.deepcopy(model)
            torch.manual_seed(cfg.seed)  # each method's randomness independent of which others ran
            result = unlearn(cls(), net, forget=self._loader(forget_ds, 2), retain=self._loader(retain_ds, 3),
                             store=store, **hparams)
            return net, result

        calibration = None
        if cfg.calibrate and supports_calibration(cls):
            net, result, calibration = calibrated_run(run, cls, hp, user, target.value, forget_batches)
        else:
            net, result = run(hp)
        try:
            scores = evaluate(net)
        except metrics.NonFiniteOutputs as e:  # e.g. certified unlearning's noise at a strict (ε, δ)
            scores = {"diverged": f"non-finite outputs after unlearning ({e})"}
        row = dict(scores, seconds=result.seconds, stats=result.stats, weights_sha256=_weights_digest(net))
        if calibration is not None:  # its cost is every try's: the tries that missed the target ran too
            row.update(calibration=calibration.to_dict(), seconds=calibration.seconds_all_tries,
                       seconds_kept_try=result.seconds, steps_all_tries=calibration.steps_all_tries)
        if "diverged" not in row:
            row["verdict"] = forgetting_verdict(row, original, target.value, reference=name == "retrain")
        if store is not None:
            row.update(storage_bytes=store.nbytes(), dense_bytes=store.dense_equivalent_nbytes())
        return row


def _forget_and_keep_ratios_used(cfg: ExperimentConfig, forget_class: Optional[int], row_ratios) -> dict:
    """The forget set and keep ratios as the rows used them, for results.json: a whole class leaves
    ``forget_ratio`` unused (None); ``keep_ratio`` is the one r the rows read, ``keep_ratios`` a sweep of several,
    each None where no row read it."""
    used = [r for r in cfg.ratios() if r in row_ratios]
    return {"forget_class": forget_class, "forget_ratio": None if forget_class is not None else cfg.forget_ratio,
            "keep_ratio": used[0] if len(used) == 1 else None, "keep_ratios": used if len(used) > 1 else None}


def run_experiment(cfg: ExperimentConfig, progress: bool = True) -> dict:
    """Run ``cfg`` — one training, one forget set — and return the result dict (``results.json``):
    ``Experiment(cfg).run_once(progress)``, see :meth:`Experiment.run_once`."""
    return Experiment(cfg).run_once(progress)


__all__ = ["DEMO", "DEMO_METHODS", "PAPER_METHODS", "PAPER_KEEP_RATIOS", "SEED_LIMIT", "Experiment", "ExperimentConfig",
           "demo_config", "fraction_of_steps_with_forget", "ratio_tag", "reads_keep_ratio", "run_experiment",
           "store_keys", "store_path", "validate_config"]
