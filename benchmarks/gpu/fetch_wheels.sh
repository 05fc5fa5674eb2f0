#!/usr/bin/env bash
# Here (a machine that reaches PyPI), from the repo root: downloads the wheels benchmarks/gpu/run.sh installs on
# a GPU machine that reaches no package index, into .whl/ (git-ignored; the device tool carries it: carry [".whl"]).
# The GPU image's Python is 3.12 (see the device tool's KINDS.md); the versions are the ones installed here.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
python benchmarks/gpu/wheels.py > .whl/requirements.txt
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl -r .whl/requirements.txt
du -sh .whl
