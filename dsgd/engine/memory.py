"""Keep freed memory for reuse: large per-step tensors without page faults.

Every step allocates a few (m, P) tensors (gossip output, gradients, momentum). glibc serves
allocations above 32 MB with fresh ``mmap`` pages and returns them on free, so each step pays
page faults for the whole working set again: at m = 256 MLP workers that was over half the
step time on CPU (docs/performance-history.md). Raising glibc's mmap and trim thresholds lets freed
blocks be reused. The ``dsgd`` command line does this at start; call it yourself in scripts
that train many workers on CPU. It changes the allocator of the whole process (freed memory is
kept, not returned to the system), so a library import never does it implicitly.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory(mmap_threshold: int = 2_000_000_000) -> bool:
    """Ask glibc to keep freed blocks below ``mmap_threshold`` bytes; True if it accepted."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
        return False
    ok_mmap = mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(min(mmap_threshold, 2**31 - 1)))
    ok_trim = mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1))
    return bool(ok_mmap and ok_trim)
