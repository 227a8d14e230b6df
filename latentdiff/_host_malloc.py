"""Opt-in glibc malloc settings for CPU training (LATENTDIFF_MALLOC_TUNING=1), applied at import before JAX starts.

XLA:CPU allocates each step's temporaries afresh (one buffer of hundreds of MB plus tens of MB-sized ones). glibc
serves requests over 32 MB, and any request a thread arena's 64 MB heap cannot hold, with a fresh mmap and returns it
with munmap on free, so every step page-faults and zeroes them again: 16% of the tiny stage-1 bench step's CPU time
was in the kernel, mostly its page-fault path (perf; bench/RESULTS.md, session 7). Capping the arenas at the core
count and turning off mmap and trimming keeps freed buffers in the heap for the next step.

Opt-in because the effect depends on the step: on the 2-core CPU the bench's tiny stage-1 step ran 16% faster and its
small stage-2 step 7–23% faster, but the demo recipe's stage 2 ran ~12% slower (likely: fewer arenas serialise the
runtime's small allocations; one arena made the tiny stage-2 step 35% slower) and its stage 1 unchanged. Never applied
over GLIBC_TUNABLES or MALLOC_ARENA_MAX, nor off glibc.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Mapping

OPT_IN = "LATENTDIFF_MALLOC_TUNING"
# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
KEEP_FREED = 2**31 - 1  # trim threshold (a C int): free memory at the heap top is kept up to 2 GiB


def malloc_settings(cpu_count: int) -> dict[int, int]:
    """mallopt {parameter: value}: arenas capped at the core count, no mmap, freed memory kept."""
    return {M_ARENA_MAX: max(1, cpu_count), M_MMAP_MAX: 0, M_TRIM_THRESHOLD: KEEP_FREED}


def should_tune(environ: Mapping[str, str]) -> bool:
    """Whether to apply `malloc_settings`: opted in, and the user set no glibc malloc settings of their own."""
    if environ.get(OPT_IN) != "1":
        return False
    return "MALLOC_ARENA_MAX" not in environ and "GLIBC_TUNABLES" not in environ


def apply_malloc_settings(environ: Mapping[str, str] | None = None) -> bool:
    """Applies `malloc_settings` when `should_tune` holds and libc is glibc. Returns whether they were applied.

    Must run before JAX starts its threads (threads keep the arena they first allocated from).
    """
    env = os.environ if environ is None else environ
    if not sys.platform.startswith("linux") or not should_tune(env):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (glibc only: other libcs do not share these mallopt numbers)
    except (OSError, AttributeError):
        return False
    return all(libc.mallopt(p, v) == 1 for p, v in malloc_settings(os.cpu_count() or 1).items())
