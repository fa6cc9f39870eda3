"""Everything measured on one model in one call, and its gap to the retrained model (docs/protocol.md#metrics)."""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence

import torch
from torch import nn

from .accuracy import accuracy_of
from .mia import SVC_FEATURES, loss_lr_mia_from_losses, svc_mia_from_outputs
from .outputs import collect_outputs

#: The columns averaged by :func:`gap_to` by default: SalUn's Avg. Gap (|ΔUA| = |ΔFA|, so FA stands for UA).
GAP_KEYS = ("RA", "FA", "TA", "MIA")


def evaluate(model: nn.Module, *, forget, retain, test, lr_mia: bool = True,
             svc_features: Sequence[str] = SVC_FEATURES, svc_max_per_group: Optional[int] = 2000,
             n_splits: int = 10, seed: int = 0, device: Optional[torch.device] = None) -> Dict[str, float]:
    """Evaluate ``model`` on loaders of D_f (``forget``), D_r (``retain``) and D_t (``test``), one forward pass
    over each. Keys of the returned row (all in [0, 1]):

    * ``RA``, ``FA``, ``TA``: top-1 accuracy on D_r, D_f, D_t; ``UA`` = 1 − FA.
    * ``MIA``: the paper's shadow-trained MIA — SalUn's SVC attack with the ``confidence`` feature, trained
      on D_r (member) vs D_t (non-member), fraction of D_f predicted member
      (:func:`~unlearn_ext.metrics.mia.svc_mia_from_outputs`); ``MIA_entropy`` and ``MIA_loss``: the same
      attack on those features. Only the features in ``svc_features`` are computed (``()`` skips them).
    * ``LR_MIA``: the challenge / Deep Unlearn loss-LR attack accuracy, D_f vs D_t, 10-fold CV
      (:func:`~unlearn_ext.metrics.mia.loss_lr_mia_from_losses`); ``LR_MIA_std`` over folds; ``indisc`` its
      indiscernibility 1 − |acc − 0.5|/0.5. Skipped with ``lr_mia=False``.
    * ``n_forget``, ``n_retain``, ``n_test``: sample counts.
    """
    out_f = collect_outputs(model, forget, device)
    out_r = collect_outputs(model, retain, device)
    out_t = collect_outputs(model, test, device)
    fa = accuracy_of(out_f)
    row = {"RA": accuracy_of(out_r), "FA": fa, "TA": accuracy_of(out_t), "UA": 1.0 - fa}
    if svc_features:
        svc = svc_mia_from_outputs(out_r, out_t, out_f, svc_features, svc_max_per_group, seed)
        row.update({("MIA" if f == "confidence" else f"MIA_{f}"): v for f, v in svc.items()})
    if lr_mia:
        lr = loss_lr_mia_from_losses(out_f.loss.numpy(), out_t.loss.numpy(), n_splits=n_splits, seed=seed)
        row.update(LR_MIA=lr["accuracy"], LR_MIA_std=lr["accuracy_std"], indisc=lr["indiscernibility"])
    row.update(n_forget=len(out_f), n_retain=len(out_r), n_test=len(out_t))
    return row


def gap_to(reference_row: Mapping[str, float], row: Mapping[str, float],
           keys: Optional[Sequence[str]] = None) -> Dict[str, float]:
    """Gap of ``row`` to ``reference_row`` (the retrained model): ``gap_<k>`` = |row[k] − reference[k]| for each
    key, and ``avg_gap`` = their mean (SalUn's / Deep Unlearn's Avg. Gap). ``keys=None`` uses those of
    :data:`GAP_KEYS` present in both rows; keys given explicitly must be present in both."""
    if keys is None:
        keys = [k for k in GAP_KEYS if k in reference_row and k in row]
    else:
        missing = [k for k in keys if k not in reference_row or k not in row]
        if missing:
            raise KeyError(f"gap_to: {missing} missing from a row")
    if not keys:
        raise ValueError("gap_to: no metric in common to compare")
    gaps = {f"gap_{k}": abs(float(row[k]) - float(reference_row[k])) for k in keys}
    gaps["avg_gap"] = sum(gaps.values()) / len(gaps)
    return gaps
