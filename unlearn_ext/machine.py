"""Facts about the machine a measurement ran on, collected one way for every benchmark, ``unlearn-ext bench``
and ``results.json``: :func:`machine_facts` (a dict, stored as is in results files) and
:func:`describe_machine` (the one line a results page prints); :func:`git_commit` names the code a harness ran
and :func:`describe_commit` words it for the page."""
from __future__ import annotations

import os
import platform
import subprocess
from typing import Optional

import torch

from . import build_info

#: The lines of ``lscpu`` kept, under lscpu's own names.
_LSCPU_KEYS = ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket")
#: The build facts kept (:func:`unlearn_ext.build_info`).
_BUILD_KEYS = ("version", "backend", "cuda_compiled", "cuda_arch_list", "openmp", "threads", "torch", "torch_cuda")


def machine_facts() -> dict:
    """Python and torch versions, CPU count, torch's thread count, the architecture and operating system, the
    CPU model and topology (``lscpu``; the CPU model from ``platform.processor()`` where lscpu is missing), the
    load averages (1, 5, 15 minutes) at the call, the first GPU's name when CUDA is available, and
    unlearn_ext's build facts."""
    facts = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
             "torch_threads": torch.get_num_threads(), "arch": platform.machine(),
             "os": f"{platform.system()} {platform.release()}"}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            key, _, val = line.partition(":")
            if key.strip() in _LSCPU_KEYS:
                facts[key.strip()] = val.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    facts.setdefault("Model name", platform.processor() or "unknown CPU")
    load = load_averages()
    if load is not None:
        facts["loadavg"] = load
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
    info = build_info()
    facts["build_info"] = {k: info.get(k) for k in _BUILD_KEYS}
    return facts


def load_averages() -> Optional[str]:
    """The 1, 5 and 15 minute load averages as ``"0.52 0.61 0.70"``; None where the system keeps none."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return None


def describe_machine(facts: Optional[dict] = None) -> str:
    """One line for a results page: CPU model and count, operating system, Python, torch and its threads,
    unlearn_ext and its kernels (of ``facts``, default :func:`machine_facts` now)."""
    f = machine_facts() if facts is None else facts
    build = f["build_info"]
    gpu = f", {f['gpu']}" if "gpu" in f else ""
    return (f"{f['Model name']}, {f['cpu_count']} CPUs{gpu}, {f['os']}, Python {f['python']}, torch {f['torch']} "
            f"with {f['torch_threads']} threads, unlearn_ext {build['version']} ({build['backend']} kernels)")


def git_commit(folder: Optional[str] = None) -> Optional[dict]:
    """The git checkout at ``folder`` (default: the current directory) as ``{"commit": HEAD's hash, "dirty":
    whether tracked files differ from it}``, read now (untracked files do not count, as in ``git describe
    --dirty``); None outside a checkout or where git is missing."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10)
        # no optional locks: a harness must not take the index lock from whoever else works in the checkout
        status = subprocess.run(["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"],
                                cwd=folder, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0 or status.returncode != 0:
        return None
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


def describe_commit(git: Optional[dict]) -> str:
    """Words for a results page naming the code of a :func:`git_commit` record."""
    if git is None:
        return "not in a git checkout"
    return f"commit `{git['commit'][:12]}`" + (" with uncommitted changes" if git["dirty"] else "")


__all__ = ["describe_commit", "describe_machine", "git_commit", "load_averages", "machine_facts"]
