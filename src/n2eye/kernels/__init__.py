"""Our CPU kernels (weight-only int8/int4 matrix-vector products), compiled on first use for this CPU.

`gemv()` returns the compiled module, or None where it can't run: no AVX-512 VNNI, no C++ compiler or ninja,
or `N2EYE_KERNELS=0`. Callers then use PyTorch's stock kernels, so nothing depends on the build succeeding.
The build (about 20 s, once) goes to N2EYE_CACHE/kernels, keyed by the source, torch version and CPU.
"""

from __future__ import annotations

import hashlib
import os
import platform
import warnings
from functools import lru_cache
from pathlib import Path

SOURCE = Path(__file__).with_name("gemv_cpu.cpp")
REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def unavailable_reason() -> str | None:
    """Why the fast kernels can't be used here (None: they can)."""
    if os.environ.get("N2EYE_KERNELS", "1") == "0":
        return "N2EYE_KERNELS=0"
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"{platform.machine()} CPU (the kernels are x86 AVX-512)"
    missing = [f for f in REQUIRED_FLAGS if f not in cpu_flags()]
    if missing:
        return "this CPU lacks " + ", ".join(missing)
    return None


@lru_cache(maxsize=1)
def gemv():
    """The compiled kernel module, or None (with one warning saying why, when the build itself failed)."""
    if unavailable_reason():
        return None
    import torch
    from torch.utils.cpp_extension import load

    from ..cache import cache_root as cache_dir

    key = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + " ".join(sorted(cpu_flags())).encode())
    build_dir = cache_dir() / "kernels" / key.hexdigest()[:16]
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        return load(
            name="n2eye_gemv",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            verbose=False,
        )
    except Exception as error:  # no compiler, no ninja, headers missing: fall back, say so once
        warnings.warn(f"n2eye: fast int8/int4 CPU kernels unavailable ({error}); using PyTorch's stock kernels")
        return None
