"""glibc ``malloc`` settings for CPU runs: keep freed tensor memory in the heap for reuse.

PyTorch's CPU allocator is ``malloc``. With glibc's defaults, tensors of a few MiB and up are
mapped fresh from the OS and their pages are returned when freed (``mmap``/``munmap``, heap
trimming), so every training step pays a page fault per 4 KiB of every activation, gradient
and temporary it allocates: on a VM that costs more than the memory traffic of the kernels
themselves. :func:`retain_freed_memory` raises the ``mmap`` threshold to glibc's maximum and
stops heap trimming, so steady-state steps reuse pages they already touched. The process
keeps its peak heap size instead of shrinking between steps. CPU training applies it
(``--device cpu``); glibc settings of your own (``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_``) take precedence, and other allocators (jemalloc or tcmalloc
through ``LD_PRELOAD``) ignore it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MAX_MMAP_THRESHOLD = 32 << 20
"""glibc's upper limit for ``M_MMAP_THRESHOLD`` on 64-bit (``HEAP_MAX_SIZE / 2``); larger
allocations are always mapped."""
NO_TRIM = 2**31 - 1


@functools.lru_cache(maxsize=1)
def retain_freed_memory() -> bool:
    """Apply the settings (once per process); False where glibc's ``mallopt`` is unavailable
    or the environment sets its own thresholds."""
    if any(key in os.environ for key in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MAX_MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, NO_TRIM))
