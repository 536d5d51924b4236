"""Keep freed memory for reuse instead of handing it back to the operating system (glibc).

A training step allocates and frees the same activation-sized buffers every time (0.1–0.5 MB
each for the reference MLP). glibc's malloc hands freed memory at the top of its heap back to
the kernel once it passes a trim threshold, and serves blocks above a size threshold with
``mmap``; both thresholds move at run time. Whatever goes back comes back as page faults on the
next step: measured here (one thread, csr reference MLP), processes took 0.1–96 faults a step
depending on how the thresholds had drifted, and the step took up to ~20% longer at 96.
Fixing both thresholds ends that: freed memory stays with the process (its resident size
stays at its peak, as with PyTorch's CUDA caching allocator) and steps take ~0 faults.

The command line calls :func:`reuse_freed_memory` when it starts. Library users may call it
themselves, or set glibc's own ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_``
(both: setting one alone turns the other's adaptation off and makes things worse).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit systems
TRIM_THRESHOLD = 1 << 30  # free memory the heap keeps at its top before returning any


def reuse_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds so that freed memory is reused, not returned to the
    operating system. Nothing happens off glibc, or where the user set any ``MALLOC_*_``
    variable (their choice stands). Returns whether the thresholds were set."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name.startswith("MALLOC_") and name.endswith("_") for name in os.environ):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except (OSError, AttributeError):  # no C library to load, or no mallopt in it
        return False
