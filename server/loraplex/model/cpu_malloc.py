"""Keep large CPU allocations on the heap, so a buffer freed in one layer is reused by the next.

bitsandbytes' NF4 layers on the CPU dequantize each weight into a fresh tensor at every call
(4-12 MB for a d=1024 model, hundreds of MB for 7B), and glibc serves allocations that large
with mmap: every call then maps new pages, faults each one in and zeroes it, and unmaps them
again. `tune()` raises glibc's mmap threshold to its maximum (32 MiB) and stops it trimming the
heap top, so those buffers come from memory the process already has. Peers do the same with
another allocator (vLLM's CPU backend preloads tcmalloc). Measured with the torch profiler on
the bench model (16 decode streams, one adapter vs none, --max-lora-rank 64): without the
thresholds a step with the adapter spent 20-42 ms more in the base layers' dequantize and
matmul than a step without (the adapter's temporaries tipped glibc into trimming); with them,
the same time.

Not glibc (musl, macOS): nothing to do, tune() says so and returns False.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's largest accepted value on 64-bit
TRIM_THRESHOLD = 2**30  # give the heap top back only past 1 GiB free


def tune() -> bool:
    """Apply the thresholds to this process; True where glibc took both."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.info("CPU allocator left as is: this C library has no mallopt")
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    done = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if done:
        log.info("CPU allocator: allocations up to %d MiB stay on the heap (NF4 layers reuse their dequantized weights' memory)",
                 MMAP_THRESHOLD_MAX // 2**20)
    else:
        log.warning("CPU allocator: mallopt refused the thresholds; large allocations stay on mmap")
    return done
