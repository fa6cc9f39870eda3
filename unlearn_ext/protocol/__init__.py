"""The evaluation protocol (docs/protocol.md): what every row of an experiment must satisfy to mean something.

* :mod:`.splits` — the validation half carved out of the test split (calibration reads it; TA is reported
  on the other half);
* :mod:`.runner_hparams` — what the experiment runner hands each method (its own defaults, the run's facts, and the
  model's learning rate only where the method's definition says so);
* :mod:`.calibration` — the forgetting target and running a method with a strength knob until it is met;
* :mod:`.verdict` — what a row says about itself: target met or missed, "no forgetting", weights equal to the
  original's, MIA figures too small to trust;
* :mod:`.ulira_adapter` — any registered method as U-LiRA's ``unlearn_fn`` (:func:`method_unlearn_fn`).
"""
from .calibration import (LR_GRID, STEP_BUDGET, Calibration, ForgettingTarget, calibrated_run, forgetting_target,
                          supports_calibration)
from .runner_hparams import RUN_FACTS, method_hparams
from .splits import validation_split
from .ulira_adapter import method_unlearn_fn
from .verdict import MIN_MIA_MEMBERS, forgetting_verdict, mia_reliable

__all__ = ["LR_GRID", "STEP_BUDGET", "Calibration", "ForgettingTarget", "calibrated_run", "forgetting_target",
           "supports_calibration", "RUN_FACTS", "method_hparams",
           "validation_split", "MIN_MIA_MEMBERS", "forgetting_verdict", "mia_reliable", "method_unlearn_fn"]
