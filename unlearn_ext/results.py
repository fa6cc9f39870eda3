"""Presenting an experiment: the results table, the summary and leakage lines, results.json and the PNG chart.

Every file is written atomically (:func:`.durable.atomic_write`): a failed or interrupted write (a full disk,
Ctrl-C) raises and leaves an earlier file at that path as it was, never a torn one."""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional

from .durable import atomic_write
from .protocol import MIN_MIA_MEMBERS, mia_reliable

COLUMNS = [  # (header, row key of metrics.evaluate / run_experiment, format)
    ("RA", "RA", "{:.3f}"), ("FA", "FA", "{:.3f}"), ("TA", "TA", "{:.3f}"),
    ("MIA (SVC, D_f member)", "MIA", "{:.3f}"), ("LR-MIA acc", "LR_MIA", "{:.3f}"), ("indisc.", "indisc", "{:.3f}"),
    ("forgetting", "forgetting", "{}"), ("storage MB", "storage_mb", "{:.2f}"),
    ("seconds (all tries)", "seconds", "{:.1f}"), ("RTE (all tries)", "rte", "{:.1f}"), ("Avg.Gap", "avg_gap", "{:.3f}"), ("steps undone", "steps_undone", "{:.1%}"),
]
#: Columns computed by a membership attack: marked † in a row whose attack had too few members.
MIA_KEYS = ("MIA", "LR_MIA", "indisc")
UNRELIABLE = "†"


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


def forgetting_cell(row: dict, target: Optional[float] = None) -> str:
    """The row's forgetting in words: the target for the original; for a method whether it met the target
    (calibrated: in how many steps at which learning rate, or after how many tries it missed, and the steps
    of every try when there were several), after the
    row's flag ("no forgetting", "weights equal the original's") if it has one."""
    verdict = row.get("verdict")
    if verdict is None:
        return "" if target is None else f"target FA ≤ {target:.3f}"
    if verdict.get("reference"):
        return f"the reference: FA {'≤' if verdict['met'] else '>'} target {verdict['target']:.3f}"
    cal = row.get("calibration")
    if cal:
        kept = cal["tries"][cal["chosen"]]
        lr = "" if kept["lr"] is None else f", lr {kept['lr']:.3g}"
        how = (f"met in {kept['steps']} steps{lr}" if verdict["met"] else
               f"missed after {len(cal['tries'])} tries (budget {cal['budget_epochs']} epochs{lr})")
        if len(cal["tries"]) > 1 and cal.get("steps_all_tries") is not None:
            how += f"; {cal['steps_all_tries']} steps over {len(cal['tries'])} tries"
    else:
        stats = row.get("stats", {})
        steps = stats.get("steps", stats.get("finetune_steps"))
        how = ("met" if verdict["met"] else "missed (not calibrated)") + ("" if steps is None else f", {steps} steps")
    return "; ".join(x for x in (verdict["flag"], how) if x)


def _cell(row: dict, key: str, fmt: str, target: Optional[float]) -> str:
    if key == "storage_mb":
        return storage_cell(row)
    if key == "forgetting":
        return forgetting_cell(row, target)
    v = metric(row, key)
    if v is None:
        return ""
    return fmt.format(v) + (UNRELIABLE if key in MIA_KEYS and not mia_reliable(row) else "")


def table(result: dict) -> str:
    """A markdown table: one row per model, the retrained model's row first after the original; a footnote
    when a membership figure rests on fewer than :data:`~.protocol.MIN_MIA_MEMBERS` members per group."""
    target = result.get("forgetting_target", {}).get("value")
    heads = ["method"] + [h for h, _, _ in COLUMNS]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    unreliable = False
    for name, row in result["rows"].items():
        note = row.get("skipped") and f"skipped: {row['skipped']}" or row.get("diverged")
        if note:
            lines.append(f"| {name} | {note} |" + " |" * (len(heads) - 2))
            continue
        unreliable |= not mia_reliable(row)
        lines.append("| " + " | ".join([name] + [_cell(row, k, f, target) for _, k, f in COLUMNS]) + " |")
    if unreliable:
        lines += ["", f"{UNRELIABLE} unreliable: the membership attack had fewer than {MIN_MIA_MEMBERS} members per "
                      "group (D_f or the reported test half)."]
    return "\n".join(lines)


def summary(result: dict) -> str:
    """The data, sizes, steps-undone fraction and forgetting target of a run, and its notes."""
    s = result["sizes"]
    lines = [f"data set {result['dataset']} ({result['dataset_source']}): train {s['train']}, forget "
             f"{s['forget']}, retain {s['retain']}, validation {s.get('validation', '-')}, test {s['test']}; "
             f"model {result['config']['model']}; fraction of training steps holding a forget sample: "
             f"{result['fraction_of_steps_with_forget']:.1%} (the steps amnesiac methods undo)"]
    target = result.get("forgetting_target")
    if target:
        lines.append(f"forgetting target: FA ≤ {target['value']:.3f} ({target['basis']})")
    lines += [f"note: {n}" for n in result.get("notes", [])]
    return "\n".join(lines)


#: The original leaks measurably (docs/protocol.md#the-demo) when its SVC member fraction of D_f is at least 0.10
#: above Retrain's, or its loss-LR attack accuracy at least 0.05 above.
LEAK_MARGINS = (("MIA", "SVC member fraction of D_f", 0.10), ("LR_MIA", "loss-LR MIA accuracy", 0.05))


def leaks(result: dict) -> Optional[bool]:
    """Whether the original model leaks membership measurably against Retrain (:data:`LEAK_MARGINS`); None
    without a Retrain row."""
    rows = result["rows"]
    if "retrain" not in rows or "MIA" not in rows["retrain"]:
        return None
    return any(rows["original"][k] - rows["retrain"][k] >= margin for k, _, margin in LEAK_MARGINS
               if k in rows["original"] and k in rows["retrain"])


def leakage(result: dict) -> str:
    """One line on whether the original model leaks membership — the MIA columns mean something only if it
    does — read against Retrain (which never saw D_f), with the verdict of :func:`leaks` and the unreliable
    mark."""
    rows = result["rows"]
    original, ref = rows["original"], rows.get("retrain", {})
    parts = []
    for key, what, _ in LEAK_MARGINS:
        if original.get(key) is None:
            continue
        diff = "" if ref.get(key) is None else f" vs Retrain {ref[key]:.3f} ({original[key] - ref[key]:+.3f})"
        parts.append(f"{what} {original[key]:.3f}{diff}")
    verdict = {None: "", True: " — leaks measurably",
               False: " — does NOT leak measurably (SVC < +0.10 and loss-LR < +0.05 above Retrain): the MIA columns "
                      "say little about unlearning here"}[leaks(result)]
    mark = "" if mia_reliable(original) else \
        f" {UNRELIABLE} unreliable: fewer than {MIN_MIA_MEMBERS} members per attack group"
    return "membership leakage of the original model: " + "; ".join(parts) + verdict + mark


def write_text(text: str, path: str) -> None:
    """Write a report to ``path`` atomically (module docstring), creating its folder (results.json, the
    benchmarks' markdown tables)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, text.encode("utf-8"))


def write_json(result: dict, path: str) -> None:
    write_text(json.dumps(result, indent=2, default=repr), path)


#: The chart's bars: (legend label, row key).
CHART_KEYS = [("RA: retain accuracy", "RA"), ("FA: forget accuracy", "FA"), ("TA: test accuracy", "TA"),
              ("SVC MIA: fraction of D_f called member", "MIA")]


def chart(result: dict, path: str) -> None:
    """Grouped bars of RA, FA, TA and the SVC MIA per method, the retrained model's values as dashed lines
    (for every bar, closer to Retrain's line is better), written atomically as a PNG; the legend sits below the
    axes so it hides no bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names: List[str] = [n for n, row in result["rows"].items() if "skipped" not in row and "diverged" not in row]
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(names)), 5.2))
    try:  # the figure is closed even when drawing or writing fails
        width = 0.8 / len(CHART_KEYS)
        retrain: Dict[str, float] = result["rows"].get("retrain", {})
        for j, (label, key) in enumerate(CHART_KEYS):
            xs = [i + (j - (len(CHART_KEYS) - 1) / 2) * width for i in range(len(names))]
            bar = ax.bar(xs, [result["rows"][n].get(key, float("nan")) for n in names], width, label=label)
            if key in retrain:
                ax.axhline(retrain[key], color=bar.patches[0].get_facecolor(), ls="--", lw=0.8)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right")
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("score (dashed: Retrain's; closer is better)")
        ax.set_title(f"{result['dataset']} / {result['config']['model']}: unlearning methods vs Retrain")
        fig.legend(*ax.get_legend_handles_labels(), ncol=2, fontsize=8, loc="lower center", frameon=False)
        fig.tight_layout(rect=(0, 0.1, 1, 1))
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    finally:
        plt.close(fig)
