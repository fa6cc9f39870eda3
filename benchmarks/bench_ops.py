"""Kernel benchmarks from a source tree: ``python benchmarks/bench_ops.py [arguments]`` runs
``unlearn-ext bench`` (the code is unlearn_ext/bench.py, so that an installed package has it too)."""
import os
import sys

try:
    from unlearn_ext import bench
except ImportError:  # run from a source tree without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from unlearn_ext import bench

if __name__ == "__main__":
    sys.exit(bench.main(prog="python benchmarks/bench_ops.py"))
