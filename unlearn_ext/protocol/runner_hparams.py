"""What the experiment runner hands each method (docs/protocol.md#what-each-method-is-given).

A method gets its class's documented defaults, overridden only by

* the run's facts it declares (:data:`RUN_FACTS`: the seed, the class count, the model factory and the
  training recipe — not choices, descriptions of the run);
* the model's training learning rate, only for the methods whose definition uses it (those declaring
  :attr:`~unlearn_ext.methods.Method.uses_model_lr`: the paper's Algorithms 2–3 train "at the model's learning
  rate"; FT runs the training recipe, and naive amnesiac's fine-tune is FT's recipe for one epoch; Retrain
  gets the recipe itself as a run fact) — every other baseline keeps its original code's rate;
* the run's keep ratio r, only for the methods declaring
  :attr:`~unlearn_ext.methods.Method.takes_run_keep_ratio` (the paper's layer-wise partial Algorithms 2–3;
  partial amnesiac's r is its recording's);
* what the user passed for that method (``--hparams``), last.
"""
from __future__ import annotations

from typing import Mapping, Type

from ..methods import Method

RUN_FACTS = ("seed", "num_classes", "model_factory", "train_config")


def method_hparams(method: Type[Method], facts: Mapping[str, object], model_lr: float, keep_ratio: float,
                   user: Mapping[str, object]) -> dict:
    """The hyper-parameters to pass ``method`` (a registered class) on top of its defaults; see the module
    docstring for the rule."""
    hp = {k: facts[k] for k in RUN_FACTS if k in method.defaults and k in facts}
    if method.uses_model_lr:
        hp["lr"] = model_lr
    if method.takes_run_keep_ratio:
        hp["keep_ratio"] = keep_ratio
    hp.update(user)
    return hp
