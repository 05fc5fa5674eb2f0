"""The one root of everything n2eye keeps between runs: generated fixtures, built kernels, vision features,
fetched images. `$N2EYE_CACHE`, else `~/.cache/n2eye`."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """`$N2EYE_CACHE` when set (and not empty), else `~/.cache/n2eye`."""
    return Path(os.environ.get("N2EYE_CACHE") or Path.home() / ".cache" / "n2eye")
