"""Keeps freed CPU memory inside the process for reuse, instead of handing it back to the kernel after every step.

PyTorch allocates CPU tensors with plain malloc. glibc serves large blocks with a fresh mmap (or trims them off the
heap's top) and returns them to the kernel on free, so every training step's activations land on new pages that
the kernel must fault in and zero: keeping them made the demo model's float32 step (hidden 128, 10 x 400-token
packed rows) 1.07x faster on a busy host (1.01x on a quiet one, 2026-12-03), 1.27x on unpacked random rows
(`benchmarks/train_step.py`). The usual cure is to
preload jemalloc or tcmalloc, or to export MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ before Python starts;
`mallopt` sets the same two knobs from inside a running process, so `n2eye train` needs neither. The cost: the process keeps its peak heap (like a GPU
caching allocator) until it exits. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
KEEP_MMAP_THRESHOLD = 1 << 30  # blocks above 1 GiB (whole weight matrices of big models) still get their own mmap
KEEP_TRIM_THRESHOLD = (1 << 31) - 1  # mallopt takes an int: never trim short of 2 GiB of free heap top


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()  # only glibc has it (musl does not)
    except (OSError, AttributeError):
        return None
    return libc


def set_malloc_thresholds(mmap_threshold: int, trim_threshold: int) -> bool:
    """Sets glibc's mmap and trim thresholds (bytes); False where this is not glibc or it refused a value."""
    libc = _glibc()
    if libc is None:
        return False
    ok = bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold))
    if not ok:  # older glibc caps the mmap threshold at 32 MiB on 64-bit
        ok = bool(libc.mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024))
    return bool(libc.mallopt(M_TRIM_THRESHOLD, trim_threshold)) and ok


def keep_freed_memory() -> bool:
    """Makes freed tensors' memory stay in the process for the next step. Returns whether it took effect."""
    return set_malloc_thresholds(KEEP_MMAP_THRESHOLD, KEEP_TRIM_THRESHOLD)
