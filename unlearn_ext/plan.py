"""``unlearn-ext plan``: the bytes a recording of a registered model will take, before training.

Prints, for dense and partial recording (and each with only-ids recording when ``--only-fraction`` is
given), the bytes of one recorded step and of the whole store, as the store's own accounting counts a
representative update (:mod:`unlearn_ext.record.planner`), and whether each fits in the free space of
``--store-dir``. The model is built on the meta device and the plan computed from the layers' sizes, so a
model larger than memory, or a batch of billions of samples, plans in seconds without allocating them.
Every argument is checked before the model is built; a bad one — malformed, out of range, a size the
record format cannot hold, or a model that could never be recorded (a layer of 2**31 elements or more) —
prints one error line and exits with status 2.
"""
from __future__ import annotations

import argparse
import shutil

import torch

from .models import available_models, make_model
from .record.identity import VALUE_DTYPE_BY_NAME
from .record.planner import plan_arguments, plan_storage


def main(argv=None, prog=None) -> int:
    summary, _, details = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(prog=prog, description=" ".join(summary.split()), epilog=details,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, choices=available_models(), help="a registered model")
    parser.add_argument("--steps", type=int, required=True, help="optimizer steps of the training run")
    parser.add_argument("--keep-ratio", type=float, default=0.1, help="r of partial recording (default 0.1)")
    parser.add_argument("--value-dtype", default="float32", choices=list(VALUE_DTYPE_BY_NAME),
                        help="dtype of the stored values (default float32)")
    parser.add_argument("--only-fraction", type=float, default=None,
                        help="fraction of samples declared deletable (only_ids): adds the only-ids rows")
    parser.add_argument("--batch-size", type=int, default=128, help="samples per step (default 128)")
    parser.add_argument("--input-shape", default="1,28,28", help="C,H,W the model is sized for (default 1,28,28)")
    parser.add_argument("--num-classes", type=int, default=10, help="default 10")
    parser.add_argument("--store-dir", default=".", help="where the store will be written: its free space is "
                                                         "compared with each plan (default: here)")
    args = parser.parse_args(argv)
    try:
        shape = [int(s) for s in args.input_shape.split(",")]
    except ValueError:
        parser.error(f"--input-shape: expected C,H,W integers, got {args.input_shape!r}")
    try:
        steps, batch_size, keep_ratio, only_fraction = plan_arguments(args.steps, args.batch_size, args.keep_ratio,
                                                                      args.only_fraction)
    except ValueError as e:
        parser.error(str(e))
    try:
        free = shutil.disk_usage(args.store_dir).free
    except OSError as e:
        parser.error(f"--store-dir: cannot read the free space of {args.store_dir!r} ({e.strerror})")
    try:
        with torch.device("meta"):
            model = make_model(args.model, shape, args.num_classes)
    except ValueError as e:
        parser.error(str(e))
    except (TypeError, RuntimeError, OverflowError) as e:  # sizes torch cannot represent, even on meta
        parser.error(f"--input-shape/--num-classes: {args.model} cannot be built for inputs of shape "
                     f"{tuple(shape)} and {args.num_classes} classes ({str(e).splitlines()[0]})")
    try:
        plan = plan_storage(model, steps, batch_size, keep_ratio, getattr(torch, args.value_dtype), only_fraction)
    except ValueError as e:  # a model that could never be recorded
        parser.error(str(e))
    print(plan.table(free, args.store_dir))
    return 0
