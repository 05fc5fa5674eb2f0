#!/usr/bin/env bash
# Here (a machine that reaches PyPI), from anywhere in the repo: downloads the wheels benchmarks/gpu/run.sh installs
# on a GPU machine that reaches no package index, into .whl/ (git-ignored; the device tool carries it: carry
# [".whl"]); WHEELS_DIR=... puts them elsewhere. The GPU image's Python is 3.12 (see the device tool's KINDS.md);
# the versions are the ones installed here (benchmarks/gpu/wheels.py lists them).
set -euo pipefail
cd "$(dirname "$0")/../.."
dir=${WHEELS_DIR:-.whl}
if [ "$dir" = .whl ] && [ -d .git ]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
fi
rm -rf "$dir" && mkdir -p "$dir"
python benchmarks/gpu/wheels.py > "$dir/requirements.txt"
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$dir" -r "$dir/requirements.txt"
du -sh "$dir"
