"""What the machine offers: usable CPU cores, thread settings that do not oversubscribe them, and returning
freed memory to the operating system."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from collections.abc import Callable

import torch


def available_cpus() -> int:
    """Cores this process may run on (respects affinity masks and container CPU sets)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def set_torch_threads(threads: int | None = None) -> int:
    """One intra-op thread per usable core unless told otherwise; returns the count in force."""
    wanted = threads or available_cpus()
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)
    return wanted


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return getattr(libc, "malloc_trim", None)  # glibc only


def release_free_memory() -> None:
    """Hand heap memory that is already freed back to the operating system (glibc; a no-op elsewhere).

    CPU tensors come from malloc. Training steps and evaluation passes allocate differently shaped buffers, and
    glibc keeps the blocks one phase freed, so without this resident memory grows to the sum of the phases'
    peaks instead of the largest (MobileNetV2 at 224 px with a 7,023-slice cache: 3.1 instead of 2.6 GB).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
