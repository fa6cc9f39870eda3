"""Deletion requests over the life of a model: the main path after training with recording.

:class:`RequestLog` (:mod:`.log`) serves each request exactly once and keeps its :class:`Receipt` in an
append-only, crash-safe file (:mod:`.log_format`) bound to the recording; :mod:`.guard` refuses requests
that would take amnesiac undo past its measured regime; :mod:`.digest` names model states and recordings;
:mod:`.audit` measures a request's effect when the data set is at hand; :mod:`.commands` is the command
line (``unlearn-ext train`` / ``forget`` / ``requests``).
"""
from .digest import recording_digest, state_digest
from .guard import REGIME_LIMITS, RegimeExceeded, default_limit
from .log import RequestLog, RequestRefused, load_checkpoint
from .receipt import Receipt, history_table

__all__ = ["REGIME_LIMITS", "Receipt", "RegimeExceeded", "RequestLog", "RequestRefused", "default_limit",
           "history_table", "load_checkpoint", "recording_digest", "state_digest"]
