"""Progress without a screen: library functions take a :class:`Progress` and report through it; the CLI passes
one that draws bars (``brainscan.console``), a notebook user may pass their own. Messages go through
:mod:`logging` (logger ``brainscan``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

Advance = Callable[[int], None]


class Progress(Protocol):
    """Opens a task of ``total`` steps; the context yields ``advance(n)``."""

    def __call__(self, description: str, total: int) -> AbstractContextManager[Advance]: ...


@contextmanager
def no_progress(description: str, total: int) -> Iterator[Advance]:
    """The default :class:`Progress`: reports nothing."""
    yield lambda n=1: None
