"""``unlearn-ext train`` / ``forget`` / ``requests``: the deletion workflow on the command line.

* ``train`` trains a registry model on a registry data set while recording its updates into a new
  DiskStore; writes ``torch.save(model.state_dict())`` atomically and creates the store's request log
  (``STORE.requests``) with the trained state as its genesis and the training recipe in its header.
  ``--checkpoint-every K`` keeps checkpoints for the exact tier in ``STORE.replay/``; ``--exclude-ids`` trains
  the exact model without those ids from scratch (:mod:`.replay` defines it).
* ``forget`` serves one deletion request (:class:`~.log.RequestLog`) on a checkpoint and writes the output
  checkpoint. The router picks the tier (``--tier``/``--exact``; ``--dry-run`` prints its choice and the cost
  estimate only). Exit 0 when served (or already served, or redone bitwise), 2 on bad input (one line), 3 when
  the guard refuses (one line naming the fraction and the limit). Nothing is written on a refusal.
* ``requests`` prints a log's history, one row per request (``--json``: the receipts).

Every argument is checked before any work starts.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
from typing import List


from .. import data, models
from ..durable import atomic_save
from ..record import DiskStore
from ..argtypes import (distinct, fraction, input_file, new_file, output_file, positive_float, positive_int, seed, size,
                        unit_interval)
from .guard import RegimeExceeded
from .log import CHECKPOINT_MAGIC, TIERS, RequestLog, load_checkpoint, printable, save_to
from .log_format import read_log
from .receipt import Receipt, history_table
from ..record.identity import VALUE_DTYPE_BY_NAME
from .recipe import make_recipe, train_recorded
from .replay import OPTIMIZERS, SCHEDULES, Checkpoints, parse_phases

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_REFUSED_BY_GUARD, EXIT_INTERRUPTED = 1, 2, 3, 130


def _one_line(e: BaseException) -> str:
    """An exception's message as one printable line (its type when it has none)."""
    return printable(str(e)) or type(e).__name__


def read_ids(path: str, flag: str = "--ids") -> List[int]:
    """The sample ids of an ids file: one integer per line in ASCII digits (lines end at ``\\n``; a ``\\r``
    before it, blank lines and a UTF-8 byte-order mark are ignored); ``ValueError`` naming the file and the
    first bad line — nothing else is read as a number (``int()`` would take ``1_2`` or Arabic-Indic digits)."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{flag}: cannot read {path} ({e.strerror if isinstance(e, OSError) else e})") from None
    ids = []
    for number, line in enumerate(text.split("\n"), 1):
        word = line.rstrip("\r").strip(" \t")
        if not word:
            continue
        if not (word.isascii() and word.isdigit()):
            raise ValueError(f"{flag}: {path} line {number} is not a sample id (ASCII digits): {word[:40]!r}")
        value = int(word)
        if value >= 2 ** 63:
            raise ValueError(f"{flag}: {path} line {number}: {value} is not a sample id (an integer in [0, 2**63))")
        ids.append(value)
    if not ids:
        raise ValueError(f"{flag}: {path} holds no id")
    return ids


# ------------------------------------------------------------------------------------------------ train

def train_main(argv=None, prog: str = "unlearn-ext train") -> int:
    p = argparse.ArgumentParser(prog=prog, description="Train a registry model with its updates recorded, ready "
                                "for deletion requests (`unlearn-ext forget`).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", required=True, choices=data.available_datasets())
    p.add_argument("--model", required=True, choices=models.available_models())
    p.add_argument("--root", default=None, help="data root for user-supplied data sets")
    p.add_argument("--train-size", type=size, default=0, help="seeded subsample (0: the whole split)")
    p.add_argument("--epochs", type=positive_int, default=8)
    p.add_argument("--phases", default=None,
                   help="LO:HI:EPOCHS,...: train on positions LO..HI-1 for EPOCHS, then the next range (e.g. "
                        "pretraining then fine-tuning on new data); overrides --epochs")
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--optimizer", default="adam", choices=OPTIMIZERS)
    p.add_argument("--lr", type=positive_float, default=None, help="the learning rate (default: the model's Adam rate)")
    p.add_argument("--lr-schedule", default="constant", choices=SCHEDULES,
                   help="the learning rate by plan step: constant, or cosine down to 0 over the run")
    p.add_argument("--weight-decay", type=fraction, default=0.0, help="the optimizer's weight decay")
    p.add_argument("--seed", type=seed, default=0,
                   help="initialisation, subsample and shuffle order")
    ratio = p.add_mutually_exclusive_group()
    ratio.add_argument("--keep-ratio", type=unit_interval(False), default=0.1, help="r: record the top r of each layer's update")
    ratio.add_argument("--dense", action="store_true", help="record dense updates (naive amnesiac)")
    p.add_argument("--value-dtype", default="float32", choices=sorted(VALUE_DTYPE_BY_NAME))
    p.add_argument("--store", required=True, help="the update store to create")
    p.add_argument("--out", required=True, help="the trained state_dict (torch.save) to create")
    p.add_argument("--checkpoint-every", type=size, default=0,
                   help="keep model, optimizer and RNG state every K steps in STORE.replay/ for the exact tier "
                        "(forget --exact); 0: none")
    p.add_argument("--exclude-ids", default=None,
                   help="a file of sample ids to leave out of every batch: the exact model without them")
    p.add_argument("--no-deterministic", action="store_true",
                   help="allow non-deterministic kernels (by default a run is bitwise reproducible on the CPU)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    log_path, replay_folder = args.store + ".requests", args.store + ".replay"
    try:
        distinct({"--store": args.store, "--out": args.out, "--store's log": log_path,
                  "--store's checkpoints": replay_folder})
        for flag, path in (("--store", args.store), ("--out", args.out), ("--store (its log)", log_path),
                           ("--store (its checkpoint folder)", replay_folder)):
            new_file(flag, path)
        excluded = read_ids(input_file("--exclude-ids", args.exclude_ids), "--exclude-ids") \
            if args.exclude_ids else []
        splits = data.load_dataset(args.dataset, args.root, train_size=args.train_size or None, seed=args.seed)
        phases = parse_phases(args.phases, len(splits.train)) if args.phases else None
        unknown = sorted(set(excluded) - set(splits.train.ids.tolist()))
        if unknown:
            raise ValueError(f"--exclude-ids: {len(unknown)} id(s) are not training samples of this run, e.g. "
                             f"{unknown[:5]}")
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e).splitlines()[0])
    except KeyboardInterrupt:
        print(f"{prog}: interrupted before training; nothing written", file=sys.stderr)
        return EXIT_INTERRUPTED
    recipe = make_recipe(splits, args.model, root=args.root, train_size=args.train_size or None, seed=args.seed,
                         epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
                         lr_schedule=args.lr_schedule, weight_decay=args.weight_decay, exclude_ids=excluded, phases=phases,
                         keep_ratio=None if args.dense else args.keep_ratio, value_dtype=args.value_dtype,
                         deterministic=not args.no_deterministic)
    every = args.checkpoint_every
    try:
        if every:
            os.mkdir(replay_folder)
        model, store, seconds, steps = train_recorded(
            splits, recipe, args.store, progress=not args.no_progress,
            checkpoints=os.path.join(replay_folder, "gen-0000") if every else None, every=every)
        atomic_save(model.state_dict(), args.out)
        replay = {"folder": os.path.basename(replay_folder), "every": every, "train_seconds": round(seconds, 3),
                  "train_steps": steps} if every else None
        RequestLog.create(log_path, store, model, recipe=recipe, replay=replay)
    except (KeyboardInterrupt, ValueError, OSError) as e:  # a diverged run (NaN updates), a full disk, Ctrl-C
        for path in (log_path, args.out, args.store):  # each was checked absent: all are this run's
            with contextlib.suppress(OSError):
                os.remove(path)
        shutil.rmtree(replay_folder, ignore_errors=True)
        what = "interrupted" if isinstance(e, KeyboardInterrupt) else f"failed: {_one_line(e)}"
        print(f"{prog}: {what}; nothing kept (the partial store was removed)", file=sys.stderr)
        return EXIT_INTERRUPTED if isinstance(e, KeyboardInterrupt) else EXIT_FAILED
    span = f"in phases {args.phases}" if args.phases else f"for {args.epochs} epoch(s)"
    print(f"trained {args.model} on {len(splits.train)} {splits.name} images {span} in "
          f"{seconds:.1f} s; recorded {len(store)} steps ({store.nbytes():,} bytes) into {args.store}; wrote "
          f"{args.out} and the request log {log_path}")
    if every:
        kept = Checkpoints(os.path.join(replay_folder, "gen-0000"))
        print(f"kept {len(kept.steps())} checkpoint(s), every {every} steps, in {replay_folder} "
              f"({kept.nbytes():,} bytes, {100 * kept.nbytes() / max(1, store.nbytes()):.1f} % of the store)")
    return 0


# ----------------------------------------------------------------------------------------------- forget

def forget_main(argv=None, prog: str = "unlearn-ext forget") -> int:
    p = argparse.ArgumentParser(prog=prog, description="Serve one deletion request: undo the recorded steps that "
                                "hold the ids (each step once across the log's requests) and write the output "
                                "checkpoint. Exit 0: served or already served; 2: bad input; 3: refused by the "
                                "regime guard.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--store", required=True, action="append",
                   help="the update store (repeat for every per-rank store of a sharded run)")
    p.add_argument("--checkpoint", required=True, help="the input state_dict: the log's latest model")
    p.add_argument("--ids", required=True, help="a file of sample ids, one integer per line")
    p.add_argument("--out", default=None, help="the output state_dict to write (required but with --dry-run)")
    tier = p.add_mutually_exclusive_group()
    tier.add_argument("--tier", default="auto", choices=TIERS,
                      help="auto: amnesiac undo while the guard allows it, else exact replay when the run kept "
                           "checkpoints; amnesiac; exact")
    tier.add_argument("--exact", dest="tier", action="store_const", const="exact", help="the same as --tier exact")
    p.add_argument("--dry-run", action="store_true",
                   help="print the router's choice, t_min, the steps to replay and the estimated cost against "
                        "Retrain; do nothing")
    p.add_argument("--request-id", default=None, help="names the request (default: derived from its ids)")
    p.add_argument("--max-undone", type=fraction, default=None,
                   help="the guard's limit on the fraction of recorded steps undone (default: from the measured "
                        "regime of the store's keep ratio)")
    p.add_argument("--log", default=None, help="the request log (default: the first store's path + .requests)")
    p.add_argument("--new-log", action="store_true",
                   help="start the log: --checkpoint is the recorded run's trained model (`train` makes the log; a "
                        "store recorded in Python has none yet). Refused when the log exists")
    p.add_argument("--dataset", default=None, choices=data.available_datasets(),
                   help="audit: accuracy and membership figures before and after, on this data set")
    p.add_argument("--model", default=None, choices=models.available_models(),
                   help="audit (with --dataset): the registry model (default: the log's recipe)")
    p.add_argument("--root", default=None, help="data root: the audit's (with --dataset) and the exact tier's "
                   "training data (default: the log's recipe's)")
    p.add_argument("--json", action="store_true", help="print the receipt as JSON")
    args = p.parse_args(argv)
    log_path = args.log or args.store[0] + ".requests"
    try:
        _check_forget_paths(args, log_path)
        ids = read_ids(args.ids)
        if args.request_id is not None and (not args.request_id or not args.request_id.isprintable()):
            raise ValueError(f"--request-id must be printable and non-empty, got {args.request_id!r}")
        stores = [DiskStore(path) for path in args.store]
        state = load_checkpoint(args.checkpoint)  # once: the log's genesis (--new-log), the audit and the request
        if args.new_log:
            log = RequestLog.create(log_path, stores, state)
        else:
            log = RequestLog(log_path, stores)
        if args.dry_run:
            route = log.route(state, args.request_id, ids, max_undone=args.max_undone, tier=args.tier)
            print(json.dumps(route, indent=1) if args.json else route_summary(route))
            return 0
        audit = _audit(args, log, ids, state) if args.dataset else None
        receipt = log.forget(state, args.request_id, ids, max_undone=args.max_undone, audit=audit,
                             commit=save_to(args.out), tier=args.tier,  # --out was checked to be no input
                             data_root=args.root)
    except RegimeExceeded as e:
        print(f"{prog}: refused: {e}", file=sys.stderr)
        return EXIT_REFUSED_BY_GUARD
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # ExactUnavailable too
        p.error(_one_line(e))
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; the request was not logged (run the same command again to serve it)",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as e:  # a full disk while writing the output or the log
        print(f"{prog}: failed: {_one_line(e)}; the request was not logged (run the same command again to serve "
              "it)", file=sys.stderr)
        return EXIT_FAILED
    if log.dropped is not None:
        print(f"{prog}: note: the log's torn last entry ({log.dropped[1]} bytes at byte {log.dropped[0]}: a request "
              "that was never acknowledged) was cut off", file=sys.stderr)
    print(json.dumps(receipt.to_dict() | {"status": receipt.status}, indent=1) if args.json else receipt.summary())
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _check_forget_paths(args, log_path: str) -> None:
    """Every path of `forget` before any work (:mod:`unlearn_ext.argtypes`): the inputs exist, each store is
    given once, the log exists (or, with --new-log, does not), --out is none of them."""
    if args.dry_run and (args.dataset or args.new_log):
        raise ValueError("--dry-run does nothing: it takes neither --dataset nor --new-log")
    inputs = [("--store", input_file("--store", path)) for path in args.store]
    if len({os.path.realpath(path) for _, path in inputs}) < len(inputs):
        raise ValueError("--store: a store is given twice")
    inputs += [("--checkpoint", input_file("--checkpoint", args.checkpoint)), ("--ids", input_file("--ids", args.ids))]
    if args.new_log:
        inputs.append(("--log", new_file("--log", log_path)))
    else:
        if not os.path.lexists(log_path):
            raise ValueError(f"--log: {log_path} does not exist: `unlearn-ext train` creates a store's request log; "
                             "start one for a store recorded in Python with --new-log (--checkpoint: the trained "
                             "model). A log is never created silently: a new one would undo its steps again")
        inputs.append(("--log", input_file("--log", log_path)))
    distinct({f"{flag} #{i}": path for i, (flag, path) in enumerate(inputs)})
    if args.out is None:
        if not args.dry_run:
            raise ValueError("--out: the output state_dict to write is required (but with --dry-run)")
    else:
        output_file("--out", args.out, inputs, replaceable=CHECKPOINT_MAGIC)
    if args.model and not args.dataset:
        raise ValueError("--model is for the audit: give --dataset too")


def route_summary(route: dict) -> str:
    """The router's choice as one line (``forget --dry-run``)."""
    if route["tier"] == "already served":
        return "tier: none: the request was served already (run it without --dry-run to confirm or redo it)"
    line = f"tier: {route['tier']} ({route['reason']}); amnesiac would leave {100 * route['fraction_if_amnesiac']:.2f} %" \
           f" of the steps undone (limit {100 * route['limit']:.2f} %)"
    est = route["exact"]
    if est is None:
        return line + f"; exact tier: unavailable ({route['exact_unavailable'] or 'nothing to replay'})"
    return line + (f"; exact tier: t_min {est['t_min']}, replay from the checkpoint at step {est['replay_from']}, "
                   f"{est['replay_steps']} of {est['retrain_steps']} steps ({100 * est['fraction_of_retrain']:.1f} % "
                   f"of Retrain), about {est['estimated_seconds']:.1f} s against {est['retrain_seconds']:.1f} s")


def _audit(args, log: RequestLog, ids: List[int], state):
    """The audit of ``--dataset`` (the data split as the log's recipe trained on it, when the log has one)."""
    from .audit import Audit

    recipe = log.header().get("recipe") or {}
    model = args.model or recipe.get("model")
    if model is None:
        raise ValueError("--model: the audit needs the registry model (this log has no training recipe)")
    splits = data.load_dataset(args.dataset, args.root or recipe.get("root"), train_size=recipe.get("train_size"),
                               seed=recipe.get("seed", 0))
    net = models.make_model(model, splits.input_shape, splits.num_classes)
    try:
        net.load_state_dict(dict(state))
    except RuntimeError as e:
        raise ValueError(f"--model: --checkpoint is not a state_dict of {model} for {splits.name} "
                         f"({_one_line(e)[:200]})") from None
    return Audit(splits, model, ids, seed=recipe.get("seed", 0))


# --------------------------------------------------------------------------------------------- requests

def requests_main(argv=None, prog: str = "unlearn-ext requests") -> int:
    p = argparse.ArgumentParser(prog=prog, description="The history of a request log: one row per served request.")
    p.add_argument("--log", required=True, help="the request log (STORE.requests)")
    p.add_argument("--json", action="store_true", help="print the header and every receipt as JSON")
    args = p.parse_args(argv)
    try:
        header, receipts, torn = read_receipts(args.log)
    except (ValueError, OSError) as e:
        p.error(str(e).splitlines()[0])
    try:
        _print_history(args, header, receipts, torn)
    except BrokenPipeError:  # `| head`: the reader has gone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _print_history(args, header: dict, receipts, torn) -> None:
    if args.json:
        print(json.dumps({"header": header, "requests": [r.to_dict() for r in receipts]}, indent=1))
        return
    print(f"{args.log}: {len(receipts)} request(s) on a recording of {header.get('recorded_steps')} steps "
          f"(model {header.get('store_fingerprint')}, keep ratio {header.get('store_keep_ratio')}); genesis "
          f"{str(header.get('genesis_sha256'))[:12]}")
    if receipts:
        print(history_table(receipts))
    if torn is not None:
        print(f"(a torn end of {torn[1]} bytes at byte {torn[0]} was not read: a request that was not acknowledged)")


def read_receipts(path: str):
    """``(header, receipts, torn end)`` of the log at ``path``, without a store (read-only)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        contents = read_log(fd, path)
    finally:
        os.close(fd)
    return contents.header, [Receipt.from_dict(e) for e in contents.entries], contents.torn


__all__ = ["forget_main", "read_ids", "read_receipts", "requests_main", "route_summary", "train_main"]
