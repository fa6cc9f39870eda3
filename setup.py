"""Builds unlearn_ext._C: the C++ kernels always, the CUDA kernels whenever torch has CUDA and nvcc exists
(no GPU needed at build time).

Switches (environment):
  UNLEARN_EXT_FORCE_CPU=1   build the C++ kernels only
  UNLEARN_EXT_FORCE_CUDA=1  fail unless the CUDA kernels are built
  TORCH_CUDA_ARCH_LIST      CUDA archs; defaults to "7.5;9.0" when unset and no GPU is visible
                            (nvcc 13 cannot target 7.0: V100 users build with CUDA 12 and "7.0")
  MAX_JOBS                  parallel compile jobs (ninja)
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _resolve_cuda_home():
    """The nvcc on PATH may be a wrapper script, so torch would guess the wrong root: find the real one."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    for root in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(root, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = root
            return
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        os.environ["CUDA_HOME"] = os.path.dirname(os.path.dirname(real))


_resolve_cuda_home()

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

force_cpu = os.environ.get("UNLEARN_EXT_FORCE_CPU", "0") == "1"
force_cuda = os.environ.get("UNLEARN_EXT_FORCE_CUDA", "0") == "1"
cuda_possible = torch.version.cuda is not None and CUDA_HOME is not None and \
    os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
with_cuda = cuda_possible and not force_cpu
if force_cuda and not with_cuda:
    sys.exit("UNLEARN_EXT_FORCE_CUDA=1 but torch has no CUDA or nvcc was not found (set CUDA_HOME)")

if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
    # With no GPU and no list, torch's arch detection crashes; pick Turing + Hopper by default.
    os.environ["TORCH_CUDA_ARCH_LIST"] = (
        "" if torch.cuda.is_available() else "7.5;9.0")
    if not os.environ["TORCH_CUDA_ARCH_LIST"]:
        cap = torch.cuda.get_device_capability()
        os.environ["TORCH_CUDA_ARCH_LIST"] = f"{cap[0]}.{cap[1]}"
arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if with_cuda else ""

sources = ["csrc/ops.cpp", "csrc/autograd.cpp", "csrc/module.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
define_macros = [("UNLEARN_EXT_CUDA_ARCH_LIST", f'"{arch_list}"')]
# -fopenmp in both compile and link flags: without it at::parallel_for silently runs on one thread.
# -fno-math-errno: sqrt never sets errno, so masked_adam_'s loop vectorises it (the result is the same
# correctly rounded value; measured -8 % on an AdamW step over ResNet-18 shapes). torch >= 2.10 headers
# need C++20.
extra = {"cxx": ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno"]}
if with_cuda:
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    define_macros.append(("UNLEARN_EXT_WITH_CUDA", None))
    # --fmad=false: no fused multiply-adds, so CUDA rounds exactly like the CPU kernels.
    extra["nvcc"] = ["-O3", "-std=c++20", "--fmad=false", "--threads", "2"]
    Ext = CUDAExtension
else:
    Ext = CppExtension

ext = Ext(
    name="unlearn_ext._C",
    sources=sources,
    include_dirs=[os.path.join(HERE, "csrc")],
    define_macros=define_macros,
    extra_compile_args=extra,
    extra_link_args=["-fopenmp"],
)

setup(
    name="unlearn_ext",
    version="0.1.0",
    description="Fast machine unlearning for PyTorch: fused layer-wise top-k, sparse update stores, "
                "masked partial optimizers",
    packages=find_packages(include=["unlearn_ext", "unlearn_ext.*"]),
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["unlearn-ext=unlearn_ext.cli:main"]},
    python_requires=">=3.10",
)
