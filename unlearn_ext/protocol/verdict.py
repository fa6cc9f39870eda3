"""What a result row says about itself: whether it met the forgetting target, whether it forgot
at all, whether its weights are the original's, and whether its membership-attack figures rest on enough
members to mean anything."""
from __future__ import annotations

from typing import Mapping

#: Fewer members per attack group than this and an MIA figure is marked unreliable wherever it is printed.
MIN_MIA_MEMBERS = 50


def mia_reliable(row: Mapping[str, object]) -> bool:
    """True when both membership attacks had at least :data:`MIN_MIA_MEMBERS` members per group: D_f (the
    attacked members; the loss-LR attack balances it against as many test samples) and the reported test half
    (the non-members)."""
    return min(int(row.get("n_forget", 0)), int(row.get("n_test", 0))) >= MIN_MIA_MEMBERS


def forgetting_verdict(row: Mapping[str, object], original: Mapping[str, object], target: float,
                       reference: bool = False) -> dict:
    """``{"target", "met", "forgot", "equals_original", "flag"}`` for an unlearning row read against the original
    model's row: ``met`` = FA ≤ target; ``forgot`` = FA below the original's (a row whose forget accuracy did
    not move is flagged "no forgetting", never ranked); ``equals_original`` = bitwise the original's weights
    (a defect unless the row says why: the flag says so when the original was already at the target);
    ``flag`` is the one-phrase summary ("" when the row forgot). ``reference=True`` marks Retrain's row: it is
    not judged (its FA shows how close the target comes to a retrained model's), so it has no flag."""
    fa, fa0 = float(row["FA"]), float(original["FA"])
    equal = row.get("weights_sha256") is not None and row.get("weights_sha256") == original.get("weights_sha256")
    forgot = fa < fa0
    if equal:
        flag = ("the original already met the target: weights unchanged" if fa0 <= target else
                "weights equal the original's")
    else:
        flag = "" if forgot or reference else "no forgetting"
    verdict = {"target": float(target), "met": fa <= target, "forgot": forgot, "equals_original": equal, "flag": flag}
    return dict(verdict, reference=True) if reference else verdict
