#!/usr/bin/env bash
# Builds the LibTorch library and C++ tests with CMake (CMakeLists.txt) and runs them with ctest.
#
#   bash cpp_tests/run.sh [extra cmake -D... arguments]
#
# Environment: PYTHON (default .venv/bin/python, else python3) locates torch; BUILD_DIR (default
# build/cmake); JOBS (default 2); UNLEARN_EXT_WITH_CUDA=ON also compiles csrc/cuda/*.cu (default OFF:
# the C++ tests exercise the CPU kernels; CUDA ones run when a GPU is present and they were built);
# UNLEARN_EXT_CPU_CLONES (default OFF here: the tests then run the baseline x86-64 code, which the Python
# tests, on the AVX-512/AVX2 version the CPU picks, may not reach).
# CUDA_HOME / TORCH_CUDA_ARCH_LIST are honoured; see the "CUDA trap" note in CMakeLists.txt for why
# a CPU-only build still has to find the CUDA toolkit (torch's CMake config insists on it).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
start=$(date +%s)

PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
TORCH_PREFIX="$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')"

# cmake/ctest/ninja: from PATH, else the pip-installed ones in the venv.
if command -v cmake >/dev/null 2>&1; then CMAKE="$(command -v cmake)"; else CMAKE="$ROOT/.venv/bin/cmake"; fi
CTEST="$(dirname "$CMAKE")/ctest"
[ -x "$CTEST" ] || CTEST="$(command -v ctest)"
GEN=()
if command -v ninja >/dev/null 2>&1; then
  GEN=(-G Ninja -DCMAKE_MAKE_PROGRAM="$(command -v ninja)")
elif [ -x "$ROOT/.venv/bin/ninja" ]; then
  GEN=(-G Ninja -DCMAKE_MAKE_PROGRAM="$ROOT/.venv/bin/ninja")
fi

BUILD_DIR="${BUILD_DIR:-build/cmake}"
# A build dir configured with another generator cannot be reused.
if [ -f "$BUILD_DIR/CMakeCache.txt" ] && [ ${#GEN[@]} -gt 0 ] && ! grep -q "CMAKE_GENERATOR:INTERNAL=Ninja" "$BUILD_DIR/CMakeCache.txt"; then
  rm -rf "$BUILD_DIR"
fi

# The CUDA toolkit root (see CMakeLists.txt): an nvcc wrapper on PATH would mislead torch's FindCUDA.
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-7.5;9.0}"

"$CMAKE" -S . -B "$BUILD_DIR" "${GEN[@]}" \
  -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" \
  -DCMAKE_BUILD_TYPE=Release \
  -DUNLEARN_EXT_WITH_CUDA="${UNLEARN_EXT_WITH_CUDA:-OFF}" \
  -DUNLEARN_EXT_CPU_CLONES="${UNLEARN_EXT_CPU_CLONES:-OFF}" \
  "$@"
"$CMAKE" --build "$BUILD_DIR" -j "${JOBS:-2}"
(cd "$BUILD_DIR" && "$CTEST" --output-on-failure)
echo "cpp_tests/run.sh: passed in $(( $(date +%s) - start )) s"
