"""The guard's default limits trace to the committed regime table (issue 24, item 3): recomputed here from
benchmarks/results/amnesiac_regime.json, they must equal unlearn_ext.deletion.guard.REGIME_LIMITS."""
import json
import statistics
from collections import defaultdict
from pathlib import Path

import pytest

from unlearn_ext.deletion.guard import REGIME_LIMITS, default_limit, limit_source

REGIME = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "amnesiac_regime.json"
ROWS = {0.01: "partial_amnesiac r=0.01", 0.05: "partial_amnesiac r=0.05", 0.1: "partial_amnesiac r=0.1",
        0.2: "partial_amnesiac r=0.2", 0.5: "partial_amnesiac r=0.5", None: "amnesiac (no fine-tune)"}


def _within_up_to(runs, model, row):
    """Largest forget-set fraction of steps undone up to which the seed-mean TA − Retrain stays ≥ −2 points."""
    gaps, fractions = defaultdict(list), defaultdict(list)
    for run in runs:
        if run["model"] == model and row in run["rows"]:
            gaps[run["size"]].append(run["rows"][row]["TA"] - run["rows"]["retrain"]["TA"])
            fractions[run["size"]].append(run["undone"])
    limit = 0.0
    for size in sorted(gaps):
        if statistics.mean(gaps[size]) < -0.02:
            break
        limit = statistics.mean(fractions[size])
    return limit


def test_default_limits_are_the_regime_table_read_for_both_models():
    runs = json.loads(REGIME.read_text())
    models = sorted({r["model"] for r in runs})
    assert models == ["lenet", "mlp"]
    for ratio, row in ROWS.items():
        assert REGIME_LIMITS[ratio] == pytest.approx(min(_within_up_to(runs, m, row) for m in models), abs=1e-12)


@pytest.mark.parametrize("ratio, row", [(0.003, 0.01), (0.01, 0.01), (0.07, 0.1), (0.1, 0.1), (0.3, 0.5),
                                        (0.9, None), (1.0, None), (None, None)])
def test_an_unmeasured_keep_ratio_takes_the_next_larger_row(ratio, row):
    assert default_limit(ratio) == REGIME_LIMITS[row]
    assert ("amnesiac without fine-tune" if row is None else f"r={row:g}") in limit_source(ratio)
