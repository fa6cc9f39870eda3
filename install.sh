#!/usr/bin/env bash
# Sets up a fresh machine: the Fashion-MNIST data package (when root and apt are there), a virtualenv in
# .venv with the pinned requirements, and the compiled extension (C++ always, CUDA when nvcc is found).
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) \
    || echo "install.sh: dataset-fashion-mnist not installed; the demo will use scikit-learn's digits"
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -r requirements.txt
MAX_JOBS="${MAX_JOBS:-2}" .venv/bin/pip install -q --no-build-isolation --no-deps -e .
.venv/bin/python -c "import unlearn_ext, json; print(json.dumps(unlearn_ext.build_info()))"
