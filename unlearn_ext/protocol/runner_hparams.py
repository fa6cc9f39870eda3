"""What the experiment runner hands each method (SPEC §5.1, "each method at its own defaults").

A method gets its class's documented defaults, overridden only by

* the run's facts it declares (:data:`RUN_FACTS`: the seed, the class count, the model factory and the
  training recipe — not choices, descriptions of the run);
* the model's training learning rate, only for the methods whose definition uses it (:data:`MODEL_LR_METHODS`:
  the paper's Algorithms 2–3 train "at the model's learning rate" (SPEC §3); Retrain and FT run the training
  recipe, and naive amnesiac's fine-tune is FT's recipe for one epoch) — every other baseline keeps its
  original code's rate;
* the run's keep ratio r, only for the paper's layer-wise partial Algorithms 2–3 (partial amnesiac's r is its
  recording's);
* what the user passed for that method (``--hparams``), last.
"""
from __future__ import annotations

from typing import Mapping

MODEL_LR_METHODS = frozenset({"label_flip", "partial_label_flip", "optimization", "partial_optimization",
                              "retrain", "finetune", "amnesiac", "partial_amnesiac"})
PAPER_PARTIAL_METHODS = frozenset({"partial_label_flip", "partial_optimization"})
RUN_FACTS = ("seed", "num_classes", "model_factory", "train_config")


def method_hparams(name: str, defaults: Mapping[str, object], facts: Mapping[str, object], model_lr: float,
                   keep_ratio: float, user: Mapping[str, object]) -> dict:
    """The hyper-parameters to pass method ``name`` (whose class defaults are ``defaults``) on top of its
    defaults; see the module docstring for the rule."""
    hp = {k: facts[k] for k in RUN_FACTS if k in defaults and k in facts}
    if name in MODEL_LR_METHODS and "lr" in defaults:
        hp["lr"] = model_lr
    if name in PAPER_PARTIAL_METHODS and "keep_ratio" in defaults:
        hp["keep_ratio"] = keep_ratio
    hp.update(user)
    return hp
