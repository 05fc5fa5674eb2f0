"""Lists the Python packages `n2eye[train]` needs beyond what a GPU machine's image already holds, pinned to the
versions installed here, so they can travel as wheels to a machine that reaches no package index.

    python benchmarks/gpu/wheels.py > /tmp/wheels.txt

Walks the installed distributions' requirements from n2eye[train] down (markers evaluated for this
interpreter), leaving out torch and its CUDA libraries (the GPU image's own build is the point) and the large
compiled packages such images hold (numpy, pyarrow, pandas, pillow, matplotlib), with what only they need.
benchmarks/gpu/fetch_wheels.sh downloads the list for the GPU image's Python.
"""

from __future__ import annotations

import re
from importlib import metadata

from packaging.requirements import Requirement

KEEP_THE_IMAGES = re.compile(r"^(torch|triton|nvidia-.*|numpy|pyarrow|pandas|pillow|matplotlib|setuptools|pip|wheel)$")


def _name(text: str) -> str:
    return re.sub(r"[-_.]+", "-", text).lower()


def closure(root: str = "n2eye", extras: tuple[str, ...] = ("train",)) -> dict[str, str]:
    """name -> installed version of every distribution `root[extras]` pulls in."""
    found: dict[str, str] = {}
    todo = [(root, extras)]
    while todo:
        name, wanted = todo.pop()
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        key = _name(dist.metadata["Name"])
        if (key in found and not wanted) or KEEP_THE_IMAGES.match(key):
            continue
        found[key] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            for extra in wanted or ("",):
                if req.marker is None or req.marker.evaluate({"extra": extra}):
                    if _name(req.name) not in found:
                        todo.append((req.name, tuple(req.extras)))
                    break
    found.pop(_name(root), None)
    return dict(sorted(found.items()))


if __name__ == "__main__":
    for name, version in closure().items():
        print(f"{name}=={version}")
