"""RequestLog: the deletion requests one recorded model has served, each exactly once, each on the record.

A log belongs to one recording (one store, or the per-rank stores of one sharded run: same model
fingerprint, same steps and sample ids). Its state is the set U of recorded steps already undone and the
chain of model digests h₀ → h₁ → … (h₀ ``genesis``: the trained model; hᵢ: after request i). A request
``(request_id, D_f)`` on a model state with digest h is answered so:

* **A new id.** h must be the chain's head — else it is refused, naming both digests (serving it would drop
  the forgetting done since). Every id must be in some recorded step (else refused). The steps to undo are
  B = steps_containing(D_f) ∖ U, in step order; the guard (:mod:`.guard`) refuses a request that would take
  |U ∪ B| / (recorded steps) past its limit. Then Σ_{b∈B} Δ̂_b is subtracted in one all-or-nothing apply
  (:meth:`~unlearn_ext.record.UpdateStore.apply_to`), the output is committed (the caller's ``commit``:
  for a checkpoint, written atomically and durably), and only then is the receipt appended to the log
  (checksummed, fsynced). So each step is undone at most once across the log, and ids whose steps earlier
  requests undid change nothing (the receipt says so).
* **A served id.** The ids must be the same as when it was served. If h is its logged output, nothing is
  done ("already served"). If h is its logged input, the same steps are undone again in the same order and
  the output must be bitwise the logged one ("redone"; a retry after a crash, or a lost output file). Any
  other state is refused.

Crash safety follows from the order: a kill before the receipt is appended leaves the log as it was (the
input is still the head, and running the request again recomputes the same output); a kill after leaves
a served id, and running it again on its input redoes it bitwise. Nothing but the receipt is written to
the log, so the log holds each request once. One request at a time: serving holds an exclusive ``flock``
on the log file (a second process waits for it, then finds the new head).

Every refusal happens before anything is written and raises :class:`RequestRefused` (a ``ValueError``) or
:class:`~.guard.RegimeExceeded`, one line each.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import os
import re
import signal
import time
from typing import Callable, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Set, Tuple, Union

import torch
from torch import nn

from .. import __version__, models
from ..durable import atomic_save, crash_budget, crash_point, create_whole
from ..record import UpdateStore
from ..record.store import restored_on_failure
from ..record.identity import named_parameters, unwrap_model
from ..record.sharding import is_sharded
from ..record.validation import as_id_tensor
from . import exact, guard, log_format
from .digest import recording_digest, state_digest
from .receipt import ALREADY_SERVED, REDONE, Receipt

Tensor = torch.Tensor
State = Mapping[str, Tensor]
MAX_REQUEST_ID = 200


class RequestRefused(ValueError):
    """A request that cannot be served as given (stale state, ids not recorded, an id reused with other ids,
    a checkpoint that does not fit the store). Nothing was written."""


class RequestLog:
    """The request log at ``path`` for the recording in ``stores`` (module docstring): an existing file
    (``FileNotFoundError`` naming the path otherwise); :meth:`create` starts one.

    A log is never created implicitly: a second log for the same recording would undo its steps again."""

    def __init__(self, path, stores: Union[UpdateStore, Sequence[UpdateStore]]):
        self.path = os.fspath(path)
        self.stores = _check_stores(stores)
        self.recording = recording_digest(self.stores[0])
        self._generations = exact.Generations(self.path, self.stores)
        self._current: Optional[exact.Generation] = None  # set by each read of the log
        self.dropped: Optional[Tuple[int, int]] = None  # the torn end the last read dropped (offset, nbytes)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"{self.path}: no request log there (`unlearn-ext train` makes one; "
                                    "RequestLog.create(path, store, trained_model) starts one)")
        with self._locked(shared=True):
            pass  # reads and checks the binding

    @classmethod
    def create(cls, path, stores, state: Union[nn.Module, State], *, recipe: Optional[dict] = None,
               replay: Optional[dict] = None) -> "RequestLog":
        """Start the log of the recording in ``stores`` at ``path`` (``FileExistsError`` if it exists) with
        ``state`` — the trained model, or its ``state_dict`` — as its genesis. ``recipe``: how the model was
        trained (``unlearn-ext train`` stores it), kept in the header. ``replay``: where the run's checkpoints
        are, for the exact tier (:mod:`.exact`; ``train --checkpoint-every`` gives it). Start it from the
        trained model only: the steps of requests served before are not in it."""
        stores = _check_stores(stores)
        if replay is not None and (recipe is None or len(stores) > 1):
            raise ValueError("replay: the exact tier needs the run's recipe and its one store")
        m = stores[0].manifest
        header = {"kind": "unlearn_ext request log", "store_fingerprint": m.fingerprint,
                  "store_keep_ratio": m.keep_ratio, "store_value_dtype": m.value_dtype,
                  "recording_sha256": recording_digest(stores[0]), "recorded_steps": len(stores[0]),
                  "stores": len(stores), "genesis_sha256": state_digest(_state_and_tensors(stores, state)[0]),
                  "created_at": _now(), "unlearn_ext": __version__, "recipe": recipe, "replay": replay}
        os.close(create_whole(path, log_format.header_bytes(header), lambda: FileExistsError(
            f"{os.fspath(path)} exists already: a request log is never replaced (open it with RequestLog(path, "
            "store))")))
        return cls(path, stores)

    # -- reading -----------------------------------------------------------------------------------
    @property
    def manifest(self):
        return self.stores[0].manifest

    def header(self) -> dict:
        with self._locked(shared=True) as contents:
            return contents.header

    def receipts(self) -> List[Receipt]:
        """Every served request, in the order served (empty before the first, or without a log file)."""
        if not os.path.exists(self.path):
            return []
        with self._locked(shared=True) as contents:
            return [Receipt.from_dict(e) for e in contents.entries]

    def undone_steps(self) -> List[int]:
        """The recorded steps the log's amnesiac requests have undone since its last exact one, sorted."""
        return sorted(_undone([r.to_dict() for r in self.receipts()]))

    def current_store(self) -> UpdateStore:
        """The store later amnesiac requests undo steps of: the recording, or the newest exact replay's."""
        with self._locked(shared=True):
            return self._current.store

    # -- serving -----------------------------------------------------------------------------------
    def forget(self, target: Union[nn.Module, State], request_id: Optional[str], sample_ids, *,
               max_undone: Optional[float] = None, audit: Optional[Callable[[State], dict]] = None,
               commit: Optional[Callable[[State], None]] = None, tier: str = "auto", training_data=None,
               data_root: Optional[str] = None) -> Receipt:
        """Serve ``request_id`` — forget ``sample_ids`` — on ``target`` in place: a model (its parameters are
        changed) or a ``state_dict`` (its tensors are). ``request_id`` None names the request by its ids
        (the same ids are the same request). ``max_undone``: the guard's limit (default:
        :func:`~.guard.default_limit` of the store's keep ratio). ``audit(state) -> dict`` adds figures of the
        state before and after to a new request's receipt. ``commit(state)`` makes the output durable before
        the receipt is logged (:meth:`forget_checkpoint` writes the output checkpoint there). ``tier``: "auto"
        (the router: amnesiac undo while the guard allows it, else exact replay when the run has checkpoints),
        "amnesiac" or "exact"; the exact tier replays on ``training_data`` (default: loaded as the log's recipe
        says, from ``data_root`` if given). Returns the receipt (module docstring for what is refused)."""
        ids = _request_ids(sample_ids)
        request_id = _request_id(request_id, ids)
        limit = self._limit(max_undone)
        tier = _tier(tier)
        state, tensors = _state_and_tensors(self.stores, target)
        start_wall, start = _now(), time.perf_counter()
        digest_in = state_digest(state)
        with self._locked() as contents:
            plan = self._plan(contents, request_id, ids, digest_in, limit, max_undone, tier)
            if plan.prior is not None:
                return self._again(contents, plan.prior, digest_in, state, tensors, commit)
            audited = _Audit(audit)
            before = audited(state)
            facts = {"limit": limit, "limit_source": "max_undone" if max_undone is not None else
                     guard.limit_source(self.manifest.keep_ratio), "route": plan.route,
                     "sha256_before": digest_in, "started_at": start_wall, "unlearn_ext": __version__}
            if plan.route["tier"] == "exact":
                facts.update(self._replay(contents.header, plan, state, tensors, training_data, data_root))
            else:
                _apply(self._stores_of(self._current), tensors, plan.new)
                facts.update(steps_new=plan.new, steps_skipped=plan.skipped,
                             undone_steps=len(plan.undone) + len(plan.new), recorded_steps=len(self._current.store),
                             fraction_undone=plan.fraction, tier="amnesiac", method=self._method())
            digest_out = state_digest(state)
            after = audited(state)
            if commit is not None:
                commit(state)
            crash_point("request-after-commit")
            receipt = Receipt(request_id=request_id, sample_ids=ids, sha256_after=digest_out, seconds=0.0,
                              audit=None if audit is None else {"before": before, "after": after}, **facts)
            receipt.seconds = time.perf_counter() - start - audited.seconds
            self._append(receipt)
            crash_point("request-after-log")
            return receipt

    def route(self, target: Union[nn.Module, State], request_id: Optional[str], sample_ids, *,
              max_undone: Optional[float] = None, tier: str = "auto") -> dict:
        """What :meth:`forget` would do with these arguments, doing nothing: the tier the router picks and why,
        t_min, the steps to replay and the estimated cost against Retrain (``route`` of the receipt), or
        ``{"tier": "already served"}``. Refused as :meth:`forget` refuses."""
        ids = _request_ids(sample_ids)
        request_id = _request_id(request_id, ids)
        state, _ = _state_and_tensors(self.stores, target)
        with self._locked(shared=True) as contents:
            plan = self._plan(contents, request_id, ids, state_digest(state), self._limit(max_undone), max_undone,
                              _tier(tier))
        return {"tier": "already served"} if plan.prior is not None else plan.route

    def forget_checkpoint(self, checkpoint, out, request_id: Optional[str], sample_ids, *,
                          max_undone: Optional[float] = None, audit=None) -> Receipt:
        """:meth:`forget` on the ``state_dict`` saved at ``checkpoint`` (``torch.save(model.state_dict())``; any
        state whose recorded layers have the store's names, shapes and dtypes), writing the output state to
        ``out`` atomically and durably before the receipt is logged. ``out`` is written whatever the status
        (already served: the state given)."""
        checkpoint, out = os.fspath(checkpoint), os.fspath(out)
        if os.path.abspath(out) == os.path.abspath(checkpoint):
            raise RequestRefused("--out must differ from --checkpoint: the input stays as it is, so that a retry "
                                 "can redo the request from it")
        return self.forget(load_checkpoint(checkpoint), request_id, sample_ids, max_undone=max_undone, audit=audit,
                           commit=save_to(out))

    # -- helpers -----------------------------------------------------------------------------------
    def _plan(self, contents: log_format.LogContents, request_id: str, ids: List[int], digest_in: str, limit: float,
              max_undone: Optional[float], tier: str) -> "_Plan":
        """What answering the request on ``contents`` takes, or the refusal (module docstring)."""
        entries = contents.entries
        prior = next((e for e in entries if e["request_id"] == request_id), None)
        if prior is not None:
            if prior["sample_ids"] != ids:
                raise RequestRefused(f"request id {request_id!r} was served with {len(prior['sample_ids'])} other "
                                     "id(s); a request id names one set of ids: give this request a new id")
            return _Plan(prior, [], [], set(), 0.0, {}, [])
        head = entries[-1]["sha256_after"] if entries else contents.header["genesis_sha256"]
        if digest_in != head:
            raise RequestRefused(f"request {request_id!r}: the given model state {digest_in[:16]}… is not the "
                                 f"latest model of {self.path} ({head[:16]}…, after {len(entries)} request(s)); "
                                 "serving it would drop the forgetting done since: pass the latest output")
        current = self._current.store
        missing = current.ids_not_recorded(torch.tensor(ids, dtype=torch.int64))
        missing = missing[~torch.isin(missing, torch.tensor(self._current.excluded, dtype=torch.int64))]
        if missing.numel():
            raise RequestRefused(f"request {request_id!r}: {missing.numel()} of its {len(ids)} id(s) are in no "
                                 f"recorded training step, e.g. {missing[:5].tolist()}: not training samples of "
                                 "this recording, so their influence cannot be removed; nothing was done")
        undone = _undone(entries)
        steps = current.steps_containing(ids)
        new = [s for s in steps if s not in undone]
        recorded = len(current)
        fraction = (len(undone) + len(new)) / recorded
        forgotten = sorted({i for e in entries for i in e["sample_ids"]}.union(ids, self._current.excluded))
        t_min = exact.first_step(current, forgotten)
        unavailable = exact.unavailable_reason(contents.header, self.stores)
        route = {"tier": "amnesiac", "reason": "", "fraction_if_amnesiac": fraction, "limit": limit,
                 "exact": None if unavailable or t_min is None else exact.estimate(contents.header, self._current,
                                                                                   t_min),
                 "exact_unavailable": unavailable}
        over = bool(new) and fraction > limit
        if tier == "exact" or (tier == "auto" and over and route["exact"] is not None):
            if unavailable:
                raise exact.ExactUnavailable(f"request {request_id!r}: the exact tier cannot serve this log: "
                                             f"{unavailable}; nothing was done")
            if t_min is not None:
                route.update(tier="exact", reason="asked for" if tier == "exact" else
                             f"amnesiac undo would take {100 * fraction:.2f} % of the steps past the guard's "
                             f"{100 * limit:.2f} %")
                return _Plan(None, [], [], undone, fraction, route, forgotten)
            route["reason"] = "no recorded step holds a forgotten id: the model is already the exact one"
        elif over:
            source = "--max-undone" if max_undone is not None else guard.limit_source(self.manifest.keep_ratio)
            instead = ("retrain without the forgotten ids" if unavailable else "ask for the exact tier (--exact)") \
                if tier == "amnesiac" else f"retrain without the forgotten ids (no exact tier: {unavailable})"
            raise guard.RegimeExceeded(
                f"request {request_id!r} would undo {len(new)} more step(s), {len(undone) + len(new)} of "
                f"{recorded} recorded ({100 * fraction:.2f} %), past the limit of {100 * limit:.2f} % ({source}) "
                "up to which amnesiac undo was measured to stay within 2 test-accuracy points of retraining; "
                f"nothing was done: {instead}, or raise the limit (--max-undone / max_undone=) knowing the model "
                "will lose accuracy", fraction, limit)
        else:
            route["reason"] = "asked for" if tier == "amnesiac" else "within the guard"
        return _Plan(None, new, [s for s in steps if s in undone], undone, fraction, route, forgotten)

    def _stores_of(self, generation: exact.Generation) -> List[UpdateStore]:
        """The stores an amnesiac undo on ``generation`` applies: the recording's (every rank's), or a replay's."""
        return self.stores if generation.index == 0 else [generation.store]

    def _replay(self, header: dict, plan: "_Plan", state: State, tensors, training_data, data_root) -> dict:
        """Serve ``plan`` by exact replay (:mod:`.exact`): the state replaced in place by the replayed one; the
        receipt's facts."""
        model_keys = set(models.make_model(header["recipe"]["model"], header["recipe"]["input_shape"],
                                           header["recipe"]["num_classes"]).state_dict())
        if set(state) != model_keys:
            raise RequestRefused(f"the exact tier replaces the whole model state, but the given state's entries are "
                                 f"not the recipe's {header['recipe']['model']} ones (e.g. "
                                 f"{sorted(set(state) ^ model_keys)[:3]})")
        train_set = exact.training_set(header["recipe"], training_data, data_root)
        est = plan.route["exact"]
        result = exact.replay(self.path, header, self._current, plan.forgotten, est["replay_from"], train_set)
        crash_point("request-after-replay")
        _replace(state, result["state"])
        store = result["store"]
        return {"steps_new": [], "steps_skipped": [], "undone_steps": 0, "recorded_steps": len(store),
                "fraction_undone": 0.0, "tier": "exact", "generation": self._current.index + 1,
                "recording_sha256": recording_digest(store), "replay": result["facts"],
                "method": f"exact replay from step {est['replay_from']} without {len(plan.forgotten)} forgotten id(s)"}

    def _again(self, contents: log_format.LogContents, prior: dict, digest_in: str, state: State, tensors,
               commit) -> Receipt:
        """A served id asked again (module docstring)."""
        rid = prior["request_id"]
        if digest_in == prior["sha256_after"]:
            status = ALREADY_SERVED
        elif digest_in == prior["sha256_before"]:
            with restored_on_failure(state.values()):
                if prior.get("tier") == "exact":
                    _replace(state, exact.replayed_model(self.path, contents.header, prior))
                else:  # on the generation it was served on
                    served_on = self._generations.current(contents.header,
                                                          contents.entries[:contents.entries.index(prior)])
                    _apply(self._stores_of(served_on), tensors, prior["steps_new"])
                digest_out = state_digest(state)
                if digest_out != prior["sha256_after"]:
                    raise RuntimeError(f"request {rid!r} redone on its logged input gave {digest_out[:16]}…, not its "
                                       f"logged output {prior['sha256_after'][:16]}…: the apply was not "
                                       "reproducible (another backend or thread count?); the state was left as "
                                       "given")
            status = REDONE
        else:
            raise RequestRefused(f"request {rid!r} was served on {prior['sha256_before'][:16]}… giving "
                                 f"{prior['sha256_after'][:16]}…; the given model state {digest_in[:16]}… is "
                                 "neither, so it cannot be redone or confirmed")
        if commit is not None:
            commit(state)
        return Receipt.from_dict(prior, status=status)

    def _limit(self, max_undone) -> float:
        if max_undone is None:
            return guard.default_limit(self.manifest.keep_ratio)
        return guard.check_limit("max_undone", max_undone)

    def _method(self) -> str:
        r = self.manifest.keep_ratio
        return "amnesiac (dense, no fine-tune)" if r is None else f"partial_amnesiac r={r:g} (no fine-tune)"

    @contextlib.contextmanager
    def _locked(self, shared: bool = False) -> Iterator[log_format.LogContents]:
        """The log read under its ``flock`` (exclusive to serve, shared to read) and checked against the stores."""
        fd = os.open(self.path, os.O_RDONLY if shared else os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            contents = log_format.read_log(fd, self.path)
            self._check_binding(contents.header)
            self._current = self._generations.current(contents.header, contents.entries)
            self.dropped = contents.torn
            self._fd, self._end = fd, contents.end
            yield contents
        finally:
            self._fd = None
            os.close(fd)

    def _check_binding(self, header: dict) -> None:
        m = self.manifest
        if header.get("store_fingerprint") != m.fingerprint:
            raise ValueError(f"{self.path} is the request log of a model with fingerprint "
                             f"{header.get('store_fingerprint')}, but the store holds {m.fingerprint}")
        if header.get("recording_sha256") != self.recording:
            dropped = getattr(self.stores[0], "dropped", None)
            if dropped and header.get("recorded_steps", 0) > len(self.stores[0]):
                raise ValueError(f"{self.stores[0]!r} lost records since {self.path} was made ({dropped}): their "
                                 "updates can no longer be undone, so no request is served from it; restore the "
                                 "store from a copy")
            raise ValueError(f"{self.path} is the request log of another recording (its steps and sample ids differ "
                             f"from {self.stores[0]!r}'s: {header.get('recorded_steps')} recorded steps there, "
                             f"{len(self.stores[0])} here); give the store the log was made for")

    def _append(self, receipt: Receipt) -> None:
        """Append ``receipt`` under the exclusive lock: cut a torn end off, one write, fsync."""
        data = log_format.entry_bytes(receipt.to_dict())
        os.ftruncate(self._fd, self._end)
        torn = crash_budget("log-entry", len(data))
        if torn is not None:  # the kill tests: a write that stops part-way
            os.pwrite(self._fd, data[:torn], self._end)
            os.kill(os.getpid(), signal.SIGKILL)
        view, done = memoryview(data), 0
        while done < len(data):
            done += os.pwrite(self._fd, view[done:], self._end + done)
        os.fsync(self._fd)
        self._end += len(data)


class _Plan(NamedTuple):
    """A request's answer: a served id's logged entry (``prior``), or the steps a new one undoes (amnesiac) and
    the router's choice (``route``); ``forgotten``: every id forgotten once it is served."""

    prior: Optional[dict]
    new: List[int]
    skipped: List[int]
    undone: Set[int]
    fraction: float
    route: dict
    forgotten: List[int]


class _Audit:
    """``audit(state)`` when one was given (else None), timing the calls: they are not the request's work."""

    def __init__(self, audit: Optional[Callable[[State], dict]]) -> None:
        self.audit, self.seconds = audit, 0.0

    def __call__(self, state: State) -> Optional[dict]:
        if self.audit is None:
            return None
        start = time.perf_counter()
        try:
            return self.audit(state)
        finally:
            self.seconds += time.perf_counter() - start


_CONTROL = re.compile(r"\x1b\[[0-9;]*[A-Za-z]|[\x00-\x1f\x7f]")  # terminal escapes, control characters


def printable(text: str) -> str:
    """The first line of ``text`` without terminal escapes or control characters: safe in a one-line message
    (a pickled object's error can hold both)."""
    return _CONTROL.sub(" ", text.split("\n")[0]).strip()


#: The first bytes of a ``torch.save`` file (a zip archive): what an output checkpoint may replace.
CHECKPOINT_MAGIC = b"PK\x03\x04"


def save_to(out) -> Callable[[State], None]:
    """The ``commit`` of :meth:`RequestLog.forget` that writes the output state to ``out`` atomically and durably."""
    return lambda state: atomic_save(dict(state), out)


def load_checkpoint(path: str) -> State:
    """The ``state_dict`` saved at ``path`` (CPU tensors); ``RequestRefused`` naming ``--checkpoint`` if it is
    missing or not a dict of tensors."""
    if not os.path.isfile(path):
        raise RequestRefused(f"--checkpoint: {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (any unreadable file is the same bad input)
        reason = printable(str(e))[:200]
        raise RequestRefused(f"--checkpoint: {path} is not a torch.save file of a state_dict "
                             f"({type(e).__name__}: {reason})") from None
    if not isinstance(state, Mapping) or not all(isinstance(k, str) and isinstance(v, Tensor)
                                                 for k, v in state.items()):
        raise RequestRefused(f"--checkpoint: {path} does not hold a state_dict (a dict of name → tensor, "
                             "as torch.save(model.state_dict()) writes)")
    return state


def _check_stores(stores) -> List[UpdateStore]:
    stores = [stores] if isinstance(stores, UpdateStore) else list(stores)
    if not stores or not all(isinstance(s, UpdateStore) for s in stores):
        raise ValueError("stores: give the update store (or every per-rank store of one sharded run)")
    first = stores[0]
    for s in stores:
        if s.manifest is None or len(s) == 0:
            raise ValueError(f"stores: {s!r} holds no recorded training steps: there is nothing to undo")
        if s.manifest.fingerprint != first.manifest.fingerprint or s.manifest.keep_ratio != first.manifest.keep_ratio:
            raise ValueError(f"stores: {s!r} records another model or keep ratio than {first!r}")
    if len(stores) > 1:
        digest = recording_digest(first)
        if any(recording_digest(s) != digest for s in stores[1:]) or any(s.manifest.shards is None for s in stores):
            raise ValueError("stores: several stores must be the per-rank stores of one sharded run (the same steps "
                             "and sample ids, each its own blocks)")
    return stores


def _state_and_tensors(stores: List[UpdateStore], target) -> Tuple[State, dict]:
    """(the state whose digest names ``target``, the tensors the stores apply to), after checking ``target``
    fits every store."""
    if isinstance(target, nn.Module):
        if any(is_sharded(p) for p in target.parameters()):
            raise RequestRefused("the model's parameters are DTensor shards: serve requests on the unsharded "
                                 "model or checkpoint (the per-rank stores apply to it together)")
        for s in stores:
            try:
                s.check_model(target)
            except ValueError as e:
                raise RequestRefused(str(e)) from None
        return unwrap_model(target).state_dict(), dict(named_parameters(target))
    if not isinstance(target, Mapping):
        raise ValueError(f"target must be a model or a state_dict, got {type(target).__name__}")
    for s in stores:
        try:
            s.check_tensors(target)
        except ValueError as e:
            raise RequestRefused(f"--checkpoint does not fit the store: {e}") from None
    return target, dict(target)


def _apply(stores: List[UpdateStore], tensors: dict, steps: List[int]) -> None:
    """Undo ``steps`` of every store (each rank's blocks) in place, all or nothing across the stores."""
    if not steps:
        return
    with restored_on_failure(tensors.values(), copy=len(stores) > 1):  # one store's apply_to is all or nothing
        for s in stores:
            s.apply_to(tensors, steps, alpha=-1.0)


def _undone(entries: List[dict]) -> Set[int]:
    """The steps amnesiac requests undid since the last exact one (a replay starts the count afresh)."""
    undone: Set[int] = set()
    for e in entries:
        if e.get("tier") == "exact":
            undone.clear()
        undone.update(e["steps_new"])
    return undone


TIERS = ("auto", "amnesiac", "exact")


def _tier(tier: str) -> str:
    if tier not in TIERS:
        raise ValueError(f"tier must be one of {', '.join(TIERS)}, got {tier!r}")
    return tier


def _replace(state: State, new: State) -> None:
    """Copy ``new`` into ``state``'s tensors in place (a model's ``state_dict`` shares its parameters' memory)."""
    with torch.no_grad():
        for name, t in state.items():
            t.copy_(new[name])


def _request_ids(sample_ids) -> List[int]:
    try:
        ids = as_id_tensor(sample_ids)
    except (TypeError, ValueError) as e:
        raise RequestRefused(f"sample_ids: {e}") from None
    if ids.numel() == 0:
        raise RequestRefused("sample_ids: the request holds no id")
    return torch.unique(ids).tolist()


def _request_id(request_id: Optional[str], ids: List[int]) -> str:
    if request_id is None:
        return "ids-" + hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()[:16]
    if not isinstance(request_id, str) or not request_id or len(request_id) > MAX_REQUEST_ID \
            or not request_id.isprintable():
        raise RequestRefused(f"request_id must be a printable string of 1 to {MAX_REQUEST_ID} characters, got "
                             f"{request_id!r}")
    return request_id


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


__all__ = ["CHECKPOINT_MAGIC", "RequestLog", "RequestRefused", "load_checkpoint", "printable", "save_to"]
