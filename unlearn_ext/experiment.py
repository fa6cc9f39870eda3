"""One unlearning experiment end to end (SPEC §5–§7): load data, pick a forget set, train the original
model with the paper's protocol while recording dense and partial updates, run each method on a copy,
and evaluate every model beside the retrained one. ``unlearn-ext demo``/``run`` and
``benchmarks/reproduce_paper.py`` are thin shells around :func:`run_experiment`."""
from __future__ import annotations

import copy
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import List, Optional

import torch

from . import __version__, build_info, data, metrics, models
from .methods import available_methods, get_method, unlearn
from .record import MemoryStore, UpdateRecorder
from .train import TrainConfig, train

PAPER_METHODS = ["amnesiac", "partial_amnesiac", "label_flip", "partial_label_flip", "optimization",
                 "partial_optimization"]
DEMO_METHODS = ["retrain", "finetune"] + PAPER_METHODS + ["ng_plus", "msg", "ct"]
AMNESIAC = {"amnesiac": None, "partial_amnesiac": "keep_ratio"}  # method -> which recording it reads


@dataclass
class ExperimentConfig:
    """Every knob of one experiment; stored verbatim in results.json."""

    dataset: str = "auto"  # "auto": Fashion-MNIST when installed, else scikit-learn digits
    root: Optional[str] = None
    model: str = "lenet"
    methods: List[str] = field(default_factory=lambda: list(DEMO_METHODS))
    forget_ratio: Optional[float] = 0.01
    forget_class: Optional[int] = None
    train_size: Optional[int] = 6000  # seeded subsample of the training split (None: all of it)
    test_size: Optional[int] = 2000
    keep_ratio: float = 0.1  # r of the partial methods
    epochs: int = 8
    batch_size: int = 128
    lr: Optional[float] = None  # None: the model's recommended learning rate
    seed: int = 0
    deterministic: bool = False
    method_hparams: dict = field(default_factory=dict)  # {method: {hparam: value}}


def fraction_of_steps_with_forget(forget_fraction: float, batch_size: int) -> float:
    """With a random forget set of f·|D| samples and batch B, a fraction 1 − (1 − f)^B of all steps
    holds a forget sample — the steps amnesiac unlearning must undo."""
    return 1.0 - (1.0 - forget_fraction) ** batch_size


def _environment() -> dict:
    import numpy
    import sklearn

    return {"unlearn_ext": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "sklearn": sklearn.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "build": build_info()}


def run_experiment(cfg: ExperimentConfig, progress: bool = True) -> dict:
    unknown = sorted(set(cfg.methods) - set(available_methods()))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; available: {available_methods()}")
    torch.manual_seed(cfg.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    sizes = dict(train_size=cfg.train_size, test_size=cfg.test_size, seed=cfg.seed)
    splits = data.default_dataset(cfg.root, **sizes) if cfg.dataset == "auto" else \
        data.load_dataset(cfg.dataset, cfg.root, **sizes)
    train_ds, test_ds = splits.train, splits.test
    fids = data.forget_ids(train_ds, ratio=None if cfg.forget_class is not None else cfg.forget_ratio,
                           cls=cfg.forget_class, seed=cfg.seed)
    forget_ds, retain_ds = data.split_forget(train_ds, fids)
    bs = cfg.batch_size
    loaders = {"train": data.loader(train_ds, bs, shuffle=True, seed=cfg.seed),
               "forget": data.loader(forget_ds, bs, shuffle=True, seed=cfg.seed + 2),
               "retain": data.loader(retain_ds, bs, shuffle=True, seed=cfg.seed + 3),
               "test": data.loader(test_ds, 512)}

    def factory():
        return models.make_model(cfg.model, splits.input_shape, splits.num_classes)

    model = factory()
    lr = cfg.lr if cfg.lr is not None else models.recommended_lr(cfg.model)
    tcfg = TrainConfig(epochs=cfg.epochs, batch_size=bs, lr=lr, seed=cfg.seed)
    stores = {}
    recorders = []
    for m in cfg.methods:
        if m in AMNESIAC:
            ratio = None if AMNESIAC[m] is None else cfg.keep_ratio
            stores[m] = MemoryStore()
            recorders.append(UpdateRecorder(model, keep_ratio=ratio, store=stores[m]))
    start = time.perf_counter()
    train(model, loaders["train"], tcfg, recorders=recorders, progress="train original" if progress else None)
    train_seconds = time.perf_counter() - start
    for s in stores.values():
        s.flush()

    context = {"num_classes": splits.num_classes, "train_config": tcfg, "model_factory": factory,
               "keep_ratio": cfg.keep_ratio, "seed": cfg.seed, "lr": lr}
    def evaluate(net):
        return metrics.evaluate(net, forget=loaders["forget"], retain=loaders["retain"], test=loaders["test"],
                                seed=cfg.seed)

    rows = {"original": evaluate(model)}
    rows["original"].update(seconds=train_seconds)
    order = sorted(cfg.methods, key=lambda m: m != "retrain")  # Retrain first: the others are read against it
    for name in order:
        cls = get_method(name)
        hp = {k: v for k, v in context.items() if k in cls.defaults}
        hp.update(cfg.method_hparams.get(name, {}))
        net = copy.deepcopy(model)
        result = unlearn(cls(), net, forget=loaders["forget"], retain=loaders["retain"],
                         store=stores.get(name), **hp)
        row = evaluate(net)
        row.update(seconds=result.seconds, stats=result.stats)
        if name in stores:
            row.update(storage_bytes=stores[name].nbytes(),
                       dense_bytes=stores[name].dense_equivalent_nbytes())
        rows[name] = row
    if "retrain" in rows:
        t_retrain = rows["retrain"]["seconds"]
        for name, row in rows.items():
            row["gap"] = metrics.gap_to(rows["retrain"], row)
            if name != "original":
                row["rte"] = t_retrain / max(row["seconds"], 1e-9)
    f = len(forget_ds) / len(train_ds)
    return {"config": asdict(cfg), "environment": _environment(), "dataset": splits.name,
            "dataset_source": splits.source, "dataset_notes": splits.notes,
            "sizes": {"train": len(train_ds), "forget": len(forget_ds), "retain": len(retain_ds),
                      "test": len(test_ds)},
            "train_config": tcfg.to_dict(),
            "fraction_of_steps_with_forget": fraction_of_steps_with_forget(f, bs)
            if cfg.forget_class is None else 1.0,
            "rows": rows}
