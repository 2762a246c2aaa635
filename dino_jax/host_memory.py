"""Host memory kept from one step to the next on XLA's CPU backend.

XLA's CPU client allocates the temporaries of each run of a compiled program (3.45 GB for the
DINO ViT-S/16 train step at batch 8) with `posix_memalign` on one of its worker threads. glibc
serves an allocation that large with a fresh `mmap` and unmaps it when it is freed, so every
step page-faults all of it in again: 875k page faults and 1.7 s of kernel time a step on this
project's 2-core CPU.
"""
import ctypes
import ctypes.util

import jax

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's <malloc.h>


def keep_freed_memory() -> bool:
  """Runs single-device CPU programs on the calling thread (`jax_cpu_enable_async_dispatch`
  off), whose allocations come from glibc's main arena, and has that arena serve large blocks
  from its heap (no mmap) and never give freed memory back (no trimming; `mallopt`): the next
  step reuses the pages of the last. The process holds on to its peak host memory; other
  threads' arenas still map and unmap large blocks. The calling thread waits for each CPU
  computation, which is what a step-by-step loop does at its logging steps anyway. Returns
  False where the C library has no `mallopt` (not glibc); the dispatch is set either way."""
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  try:
    mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
  except (OSError, AttributeError, TypeError):
    return False
  return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, -1) == 1
