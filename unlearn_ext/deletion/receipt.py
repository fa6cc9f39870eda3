"""What a served deletion request leaves on the record: :class:`Receipt`, and the history as a table."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

#: How a request was answered (not stored: it describes this call, the logged receipt is the first one's).
SERVED, ALREADY_SERVED, REDONE = "served", "already served", "redone"


@dataclass
class Receipt:
    """One served request, as its log entry holds it.

    ``steps_new``: the recorded steps this request undid (in the order applied); ``steps_skipped``: steps
    holding its ids that an earlier request had already undone; ``undone_steps`` / ``recorded_steps`` /
    ``fraction_undone``: the log's total after it; ``limit`` and ``limit_source``: the guard in force;
    ``tier`` and ``method``: how it was undone; ``route``: the router's choice, its reason and the exact tier's
    estimated cost against Retrain (t_min, the checkpoint replayed from, steps, seconds); for an exact request
    ``generation``, ``recording_sha256`` (the replay's store) and ``replay`` (what the replay did);
    ``sha256_before`` / ``sha256_after``: digests of the model
    state (:func:`~.digest.state_digest`); ``seconds``: wall time of the work (checks, apply, digests, the
    output written, the entry appended; no process start, no audit); ``audit``: before/after figures when
    asked for (:mod:`.audit`). ``status`` says how *this call* answered: served now, already served (the
    given state was the request's output), or redone (the given state was its input: recomputed, bitwise
    the logged output)."""

    request_id: str
    sample_ids: List[int]
    steps_new: List[int]
    steps_skipped: List[int]
    undone_steps: int
    recorded_steps: int
    fraction_undone: float
    limit: float
    limit_source: str
    tier: str
    method: str
    sha256_before: str
    sha256_after: str
    seconds: float
    started_at: str
    unlearn_ext: str
    audit: Optional[dict] = None
    route: Optional[dict] = None
    generation: Optional[int] = None
    recording_sha256: Optional[str] = None
    replay: Optional[dict] = None
    status: str = field(default=SERVED, compare=False)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        del d["status"]
        return d

    @classmethod
    def from_dict(cls, d: dict, status: str = SERVED) -> "Receipt":
        names = {f.name for f in dataclasses.fields(cls)} - {"status"}
        return cls(**{k: v for k, v in d.items() if k in names}, status=status)

    def summary(self) -> str:
        """One line: what this call did."""
        head = f"request {self.request_id!r} ({len(self.sample_ids)} id(s)): {self.status}"
        if self.tier == "exact":
            r = self.replay or {}
            return (f"{head}; exact: replayed {r.get('replayed_steps')} step(s) from step {r.get('replay_from')} "
                    f"without {r.get('forgotten_ids')} forgotten id(s) (generation {self.generation}; "
                    f"{self.route['reason']}); {self.sha256_before[:12]} -> {self.sha256_after[:12]}; "
                    f"{self.seconds:.1f} s")
        if not self.steps_new:
            what = "nothing left to undo: earlier requests undid its steps; model unchanged" \
                if self.steps_skipped else "nothing undone"
        else:
            what = f"undid {len(self.steps_new)} step(s)"
            if self.steps_skipped:
                what += f", {len(self.steps_skipped)} already undone"
        return (f"{head}; {what}; {self.undone_steps}/{self.recorded_steps} recorded steps undone "
                f"({100 * self.fraction_undone:.2f} %, limit {100 * self.limit:.2f} %); "
                f"{self.sha256_before[:12]} -> {self.sha256_after[:12]}; {self.seconds * 1000:.0f} ms")


def history_table(receipts: Sequence[Receipt]) -> str:
    """The log's history, one Markdown row per request."""
    rows = ["| # | request | ids | steps undone | already undone | total undone | method | before → after | ms | "
            "at |", "|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(receipts, 1):
        rows.append(f"| {i} | {r.request_id} | {len(r.sample_ids)} | {len(r.steps_new)} | {len(r.steps_skipped)} | "
                    f"{r.undone_steps}/{r.recorded_steps} ({100 * r.fraction_undone:.2f} %) | {r.method} | "
                    f"{r.sha256_before[:12]} → {r.sha256_after[:12]} | {r.seconds * 1000:.0f} | {r.started_at} |")
    return "\n".join(rows)


__all__ = ["ALREADY_SERVED", "REDONE", "Receipt", "SERVED", "history_table"]
