"""Presenting an experiment: the results table, results.json and the PNG chart."""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional

COLUMNS = [  # (header, row key of metrics.evaluate / run_experiment, format)
    ("RA", "RA", "{:.3f}"), ("FA", "FA", "{:.3f}"), ("TA", "TA", "{:.3f}"),
    ("MIA (SVC, D_f member)", "MIA", "{:.3f}"), ("LR-MIA acc", "LR_MIA", "{:.3f}"), ("indisc.", "indisc", "{:.3f}"),
    ("storage MB", "storage_mb", "{:.2f}"), ("seconds", "seconds", "{:.1f}"), ("RTE", "rte", "{:.1f}"),
    ("Avg.Gap", "avg_gap", "{:.3f}"), ("steps undone", "steps_undone", "{:.1%}"),
]


def metric(row: dict, key: str) -> Optional[float]:
    """Value of column ``key`` in a result row; None if absent. ``avg_gap`` lives in the row's ``gap`` dict;
    ``steps_undone`` is an amnesiac method's fraction of recorded steps removed (its stats)."""
    if key == "avg_gap":
        v = row.get("gap", {}).get(key)
    elif key == "steps_undone":
        v = row.get("stats", {}).get("fraction_steps_affected")
    else:
        v = row.get(key)
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def storage_cell(row: dict) -> str:
    v = row.get("storage_bytes")
    return "" if v is None else f"{v / 1e6:.2f} of {row['dense_bytes'] / 1e6:.2f} dense"


def _cell(row: dict, key: str, fmt: str) -> str:
    if key == "storage_mb":
        return storage_cell(row)
    v = metric(row, key)
    return "" if v is None else fmt.format(v)


def table(result: dict) -> str:
    """A markdown table: one row per model, the retrained model's row first after the original."""
    heads = ["method"] + [h for h, _, _ in COLUMNS]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for name, row in result["rows"].items():
        note = row.get("skipped") and f"skipped: {row['skipped']}" or row.get("diverged")
        if note:
            lines.append(f"| {name} | {note} |" + " |" * (len(heads) - 2))
            continue
        lines.append("| " + " | ".join([name] + [_cell(row, k, f) for _, k, f in COLUMNS]) + " |")
    return "\n".join(lines)


def summary(result: dict) -> str:
    s = result["sizes"]
    return (f"data set {result['dataset']} ({result['dataset_source']}): train {s['train']}, forget "
            f"{s['forget']}, retain {s['retain']}, test {s['test']}; model {result['config']['model']}; "
            f"fraction of training steps holding a forget sample: "
            f"{result['fraction_of_steps_with_forget']:.1%} (the steps amnesiac methods undo)")


def leakage(result: dict) -> str:
    """One line on whether the original model leaks membership — the MIA columns mean something only if it
    does — read against Retrain (which never saw D_f)."""
    rows = result["rows"]
    parts = []
    for key, what in (("LR_MIA", "loss-LR MIA accuracy (chance 0.5)"), ("MIA", "SVC member fraction of D_f")):
        ref = rows.get("retrain", {}).get(key)
        if rows["original"].get(key) is not None:
            parts.append(f"{what} {rows['original'][key]:.3f}" + ("" if ref is None else f" vs Retrain {ref:.3f}"))
    return "membership leakage of the original model: " + "; ".join(parts)


def write_text(text: str, path: str) -> None:
    """Write a report to ``path``, creating its folder (results.json, the benchmarks' markdown tables)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def write_json(result: dict, path: str) -> None:
    write_text(json.dumps(result, indent=2, default=repr), path)


def chart(result: dict, path: str) -> None:
    """Grouped bars of RA, FA, TA and MIA per method, the retrained model's values as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names: List[str] = [n for n, row in result["rows"].items() if "skipped" not in row and "diverged" not in row]
    keys = [("RA", "RA"), ("FA", "FA"), ("TA", "TA"), ("MIA", "MIA")]
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(names)), 4.5))
    width = 0.8 / len(keys)
    retrain: Dict[str, float] = result["rows"].get("retrain", {})
    for j, (label, key) in enumerate(keys):
        xs = [i + (j - (len(keys) - 1) / 2) * width for i in range(len(names))]
        bar = ax.bar(xs, [result["rows"][n].get(key, float("nan")) for n in names], width, label=label)
        if key in retrain:
            ax.axhline(retrain[key], color=bar.patches[0].get_facecolor(), ls="--", lw=0.8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score (dashed: Retrain)")
    ax.set_title(f"{result['dataset']} / {result['config']['model']}: unlearning methods vs Retrain")
    ax.legend(ncol=4, fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
