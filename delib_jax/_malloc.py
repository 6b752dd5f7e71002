"""glibc's mmap threshold fixed for the explanation job's process (`bound_heap`, issue 33).

glibc serves a large block (128 KB and up, at first) with its own mmap, returned to the system when it is freed; but
freeing such a block raises the threshold to the block's size (up to 32 MB), so from then on blocks of that size come
from the heap, and the heap keeps what is freed in it (its top is trimmed only past twice the threshold, the rest
never). XLA:CPU runs each batch of the explanation with a block of temporaries (5.6 MB for the small test model's
batch of 64), and the job keeps several batches in flight: the first batch's block was mapped and unmapped, later ones
came from the heap, several at a time, and stayed there. A run of 50 images (one batch) never got there; one of
1,600 did within its first few batches and then levelled off (2-core VM: the main process 11-14 MB above the 50-image
run; with the threshold fixed, 3 MB). A fixed threshold (`mallopt(M_MMAP_THRESHOLD)`, which also fixes the trim
threshold at its default) keeps every large block mapped and returned when it is freed, as the first one was.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
MMAP_THRESHOLD = 1 << 20  # blocks from 1 MB on mapped: the temporaries of a batch, not the writer's small arrays
_done: list[int] = []


def bound_heap(threshold: int = MMAP_THRESHOLD) -> int | None:
    """Fix glibc's mmap threshold at ``threshold`` bytes for the rest of this process (blocks that size or larger
    are mapped, and unmapped when freed; the threshold no longer rises). Returns the threshold set, or None where
    nothing is set: not Linux with glibc, or MALLOC_MMAP_THRESHOLD_ given in the environment (the user's choice
    stands). Once per process: later calls return the first one's threshold."""
    if _done:
        return _done[0]
    if not sys.platform.startswith("linux") or os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return None
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if threshold < 1 or mallopt(M_MMAP_THRESHOLD, int(threshold)) != 1:
        return None
    _done.append(int(threshold))
    return int(threshold)
