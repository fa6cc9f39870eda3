"""``unlearn-ext bench`` from an installed package (issues 14 and 16): the benchmark code ships in the
package, so ``bench --help`` and a run work with no source tree (no benchmarks/ folder) beside it, and
the help names the command the user typed and describes it in whole sentences."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import unlearn_ext


def _installed_copy(tmp_path) -> Path:
    """The package alone with its compiled library, as a non-editable install leaves it."""
    site = tmp_path / "site"
    shutil.copytree(Path(unlearn_ext.__file__).parent, site / "unlearn_ext",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return site


_RUN = """
import json, sys
import unlearn_ext.cli as cli
print('package:', cli.__file__, flush=True)
for argv in json.loads(sys.argv[1]):
    print('=== ' + ' '.join(argv), flush=True)
    try:
        code = cli.main(argv)
    except SystemExit as e:  # --help exits
        code = e.code
    print('=== exit', code, flush=True)
"""


def _cli(site: Path, cwd: Path, *commands) -> list:
    """Run ``unlearn-ext`` with each argument list of ``commands`` in one process that sees only the
    package copy at ``site``; the output of each, checking that it exited with 0."""
    env = dict(os.environ, PYTHONPATH=str(site), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", _RUN, json.dumps(commands)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    head, *parts = done.stdout.split("=== ")
    assert head.strip() == f"package: {site / 'unlearn_ext' / 'cli.py'}"  # the copy runs, not the source tree
    outputs = parts[0::2]
    assert parts[1::2] == ["exit 0\n"] * len(commands), done.stdout + done.stderr
    return outputs


def test_bench_help_and_a_tiny_run_work_from_an_installed_package(tmp_path):
    site = _installed_copy(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    report = elsewhere / "bench.md"
    overview, usage, run = _cli(site, elsewhere, ["--help"], ["bench", "--help"],
                                ["bench", "--quick", "--device", "cpu", "--models", "tensor4096", "--reps", "1",
                                 "--markdown", str(report)])
    assert "kernel benchmarks" in overview and "bench_ops" not in overview
    text = " ".join(usage.split())
    assert "usage: unlearn-ext bench" in text and "bench_ops" not in text
    assert "on the parameter shapes of torchvision's ResNet-18 and ResNet-50" in text  # not cut mid-sentence
    assert "at keep ratios 1%, 10%, 50%." in text and "Baselines" in text
    for op in ("layerwise_topk", "sparse_accumulate_", "masked_sgd_", "masked_adam_"):
        assert f"tensor4096 cpu   {op}" in run, run
    assert "`unlearn-ext bench --quick --device cpu --models tensor4096 --reps 1" in report.read_text()
