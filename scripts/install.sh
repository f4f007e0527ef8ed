#!/usr/bin/env bash
# Create .venv (once) and install every package editable with its test extras, plus the dev tools.
# Every install goes through constraints.txt, which pins torch to the local CPU build (2.13.0),
# so pip never resolves a multi-GB CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."
python_bin=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python_bin" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt)
"${pip[@]}" "torch==2.13.0"
# First-party packages in dependency order (pip resolves a local package a sibling depends on
# only when it is listed before that sibling).
mapfile -t packages < <("$python_bin" scripts/package_order.py)
args=()
for name in "${packages[@]}"; do
  args+=(-e "packages/${name}[test]")
done
"${pip[@]}" "${args[@]}" -r requirements-dev.txt
echo "installed: $(.venv/bin/sdcore --version)"
