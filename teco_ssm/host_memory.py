"""How the C library's allocator serves XLA's CPU buffers: kept in the process instead of returned to the system.

On CPU, XLA allocates every buffer of a compiled step (activations, gradients, the logits of 16x16 frames over 512
codes) with the C library's `malloc` and frees it when the step ends. glibc serves blocks above its mmap threshold
(at most 32 MiB) with fresh pages from `mmap`, and its per-thread arenas give freed memory back to the system, so the
next step touches new pages again: every page of every large buffer costs a page fault and kernel time, each step.
That is where the system time of a CPU run goes (docs/training.md, "Allocation churn").

`configure` asks glibc (`mallopt`) for one arena, no `mmap`-served blocks and no trimming: freed buffers stay in the
heap and the next step reuses their pages. The process keeps its peak heap until it exits. The `teco-ssm` front end
and the benchmark scripts call it first thing in `main`, before XLA's backend starts its threads. Any `MALLOC_*`
environment variable (glibc's own tunables, even empty) or `TECO_SSM_MALLOC=system` leaves the allocator as it is.
Other C libraries: nothing is done.
"""
from __future__ import annotations

import ctypes
import os

# glibc's <malloc.h> parameter numbers
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2 ** 31 - 1))


def configure() -> bool:
    """Keeps freed heap memory in the process (see the module docstring). Returns True when glibc accepted every
    setting, False when it was left alone (not glibc, `TECO_SSM_MALLOC=system`, or a `MALLOC_*` variable set)."""
    if os.environ.get("TECO_SSM_MALLOC", "") == "system" or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the process already runs on
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, Windows): its allocator is left as it is
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    accepted = [mallopt(param, value) == 1 for param, value in SETTINGS]  # every setting, even after a refusal
    return all(accepted)
