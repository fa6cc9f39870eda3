"""Calibrated forgetting: the target every method is read against, and running a method with a
strength knob until it meets it.

**Target.** For a random forget set: the original model's accuracy on the validation half of the test split
(a retrained model's forget accuracy sits near its test accuracy, and the original's validation accuracy is
what a user can measure without retraining). For a whole forgotten class: chance, 1/K. Nothing here reads the
reported test half or the retrained model.

**Calibration** (:func:`calibrated_run`), for a method that can stop at a forget accuracy
(:func:`supports_calibration`: its defaults have ``stop_forget_acc`` and ``epochs``):

* it runs with ``stop_forget_acc=target`` and ``stop_every_step=True`` — the forget accuracy (on D_f, which
  calibration may read) is checked before every step and the run stops at the first step where it is at most
  the target, so naive and partial variants stop at the same forgetting;
* the step budget: a method whose epoch is one pass over D_f (it declares
  :attr:`~unlearn_ext.methods.Method.budget_in_forget_passes`) gets
  ``max(its epochs, ⌈STEP_BUDGET / batches per forget epoch⌉)`` epochs; any other keeps its own epochs;
* the learning-rate grid: its own rate (the model's rate for the paper's Algorithms 2–3) times each factor of
  :data:`LR_GRID` in turn, the first that meets the target within the budget is kept; if none does, the last
  (strongest) run is kept and the row says the target was missed.

What the user fixed through the method's hyper-parameters is not calibrated: a given ``lr`` is the only rate
tried, given ``epochs`` are the budget, a given ``stop_forget_acc`` replaces the target.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, List, Mapping, Optional, Tuple, Type

from ..methods import Method, UnlearnResult
from ..metrics import accuracy

#: Factors of a method's own learning rate tried in turn until the target is met.
LR_GRID = (1.0, 3.0, 10.0, 30.0)
#: Optimizer steps a forget-set loop may take per learning rate before the target counts as missed.
STEP_BUDGET = 250


@dataclass(frozen=True)
class ForgettingTarget:
    """Forget accuracy a method must reach (at most ``value``), and what it was derived from."""

    value: float
    basis: str


def forgetting_target(model, validation_loader, forget_class: Optional[int], num_classes: int) -> ForgettingTarget:
    """The target for ``model``'s forget set: chance for a whole class, else its validation accuracy."""
    if forget_class is not None:
        return ForgettingTarget(1.0 / num_classes, f"chance (1/{num_classes}) for a whole forgotten class")
    n = len(validation_loader.dataset)
    return ForgettingTarget(accuracy(model, validation_loader),
                            f"the original model's accuracy on the validation half ({n} samples)")


def supports_calibration(method: Type[Method]) -> bool:
    """True for a method that can stop once its forget accuracy reaches a target."""
    return "stop_forget_acc" in method.defaults and "epochs" in method.defaults


@dataclass
class Calibration:
    """How a method was run to the target: every try (learning rate, epochs budget, steps taken, forget
    accuracy reached, met, diverged, the method's seconds) and which one the row reports; the cost of a
    calibrated row is that of every try (:attr:`seconds_all_tries`, :attr:`steps_all_tries`)."""

    target: float
    budget_epochs: int
    tries: List[dict] = field(default_factory=list)
    chosen: int = -1
    fixed_by_user: List[str] = field(default_factory=list)

    @property
    def met(self) -> bool:
        return bool(self.tries and self.tries[self.chosen]["met"])

    @property
    def seconds_all_tries(self) -> float:
        """The method's seconds summed over every try: a try that missed the target was paid for too."""
        return sum(t["seconds"] for t in self.tries)

    @property
    def steps_all_tries(self) -> Optional[int]:
        """Optimizer steps summed over every try (None when the method reports no steps)."""
        steps = [t["steps"] for t in self.tries]
        return None if any(s is None for s in steps) else sum(steps)

    def to_dict(self) -> dict:
        return dict(asdict(self), met=self.met, seconds_all_tries=self.seconds_all_tries,
                    steps_all_tries=self.steps_all_tries)


def calibrated_run(run: Callable[[dict], Tuple[object, UnlearnResult]], method: Type[Method],
                   hp: Mapping[str, object], user: Mapping[str, object], target: float,
                   forget_batches: int) -> Tuple[object, UnlearnResult, Calibration]:
    """Run ``method`` (a registered class) to ``target`` (see the module docstring). ``run(hparams)`` unlearns
    a fresh copy of the original model and returns ``(model, result)``; ``hp`` are the hyper-parameters the
    runner would pass (:func:`~.runner_hparams.method_hparams`), ``user`` the part of them the user gave,
    ``forget_batches`` the number of batches of the forget loader. Returns the kept try's model and result and
    the :class:`Calibration`."""
    stop = float(user.get("stop_forget_acc", target))
    own_epochs = int(hp.get("epochs", method.defaults["epochs"]))
    if "epochs" in user or not method.budget_in_forget_passes:
        epochs = own_epochs
    else:
        epochs = max(own_epochs, math.ceil(STEP_BUDGET / max(1, forget_batches)))
    lr = hp.get("lr", method.defaults.get("lr"))
    grid = [lr] if lr is None or "lr" in user else [lr * f for f in LR_GRID]
    cal = Calibration(target=stop, budget_epochs=epochs,
                      fixed_by_user=sorted(k for k in ("lr", "epochs", "stop_forget_acc") if k in user))
    kept = None
    for rate in grid:
        trial = dict(hp, stop_forget_acc=stop, stop_every_step=user.get("stop_every_step", True), epochs=epochs)
        if rate is not None:
            trial["lr"] = rate
        model, result = run(trial)
        fa = result.stats.get("forget_acc")
        met = fa is not None and fa <= stop
        cal.tries.append({"lr": rate, "epochs": epochs, "steps": result.stats.get("steps"), "forget_acc": fa,
                          "met": met, "diverged": bool(result.stats.get("diverged")), "seconds": result.seconds})
        kept = (model, result)
        if met:
            break
    cal.chosen = len(cal.tries) - 1
    return kept[0], kept[1], cal
