"""Evaluation of unlearning (docs/protocol.md#metrics): accuracy on D_r / D_f / D_t, membership inference, efficiency.
Every function's docstring states its exact definition."""
from .accuracy import accuracy, accuracy_of, unlearning_accuracies
from .efficiency import efficiency, rte, storage
from .mia import (SVC_FEATURES, NonFiniteOutputs, indiscernibility, loss_lr_mia, loss_lr_mia_from_losses,
                  svc_mia, svc_mia_from_outputs)
from .outputs import SampleOutputs, collect_outputs
from .report import GAP_KEYS, evaluate, gap_to
from .ulira import ULiRAResult, recipe_train_fn, ulira

__all__ = ["accuracy", "accuracy_of", "unlearning_accuracies", "efficiency", "rte", "storage", "SVC_FEATURES",
           "indiscernibility", "NonFiniteOutputs", "loss_lr_mia", "loss_lr_mia_from_losses", "svc_mia",
           "svc_mia_from_outputs", "SampleOutputs", "collect_outputs", "GAP_KEYS", "evaluate", "gap_to",
           "ULiRAResult", "ulira", "recipe_train_fn"]
