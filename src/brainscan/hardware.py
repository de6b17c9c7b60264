"""What the machine offers: usable CPU cores, and thread settings that do not oversubscribe them."""

from __future__ import annotations

import os

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
