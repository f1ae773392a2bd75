"""Keeping freed memory from staying in the process (glibc's allocator).

The streamed export allocates and frees one block's tensors per block. glibc serves allocations
above its mmap threshold with their own mappings and returns them to the system on free, but after
each such free it raises the threshold up to 32 MiB (its "dynamic threshold"), so the next blocks'
tensors come from the heap, where freed chunks fragment and stay resident. Measured on SmolLM2-135M
(``edgeq export --method rtn --format ort``): resident memory grew by about 90 MB per block, to
4.1 GiB after 30 blocks; with the threshold fixed at 128 KiB, by about 20 MB per block, but every
mid-size allocation then costs fresh zeroed pages (3.5 × the page faults, 20 % more wall time on the
BoA main job). A fixed threshold of 4 MiB keeps a block's weights and activations in mappings that go
back to the system, and the heap is trimmed after each block.

On other allocators or platforms these calls do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD_BYTES = 4 * 2**20


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def fix_mmap_threshold() -> bool:
    """Serve every allocation over 4 MiB from its own mapping, returned to the system when freed
    (turns off glibc's dynamic threshold); whether it applied."""
    libc = _libc()
    return bool(libc is not None and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def trim_heap() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
