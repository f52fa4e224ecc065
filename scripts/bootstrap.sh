#!/usr/bin/env bash
# Create or reuse the virtual environment at .venv and install pid-batch with its test extras.
# torch is installed first and pinned: any unpinned torch pulled by another package would be a
# multi-GB CUDA build. On a GPU machine, install the CUDA torch you want into .venv first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.pid-batch-installed
want=$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/pip install -q --disable-pip-version-check 'torch==2.13.0'
  .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
  echo "$want" > "$stamp"
fi
