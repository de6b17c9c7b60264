"""The CLI's screen: Rich progress bars (a :class:`~brainscan.progress.Progress`) and a logging handler that
prints the library's messages. Only the CLI imports this module; the library never draws."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .progress import Advance, no_progress
from .progress import Progress as ProgressFn

console = Console(stderr=True)
STYLES = {logging.WARNING: "yellow", logging.ERROR: "bold red", logging.CRITICAL: "bold red"}


@contextmanager
def rich_progress(description: str, total: int) -> Iterator[Advance]:
    """A progress bar on stderr; yields ``advance(n)``."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)


def screen_progress(quiet: bool) -> ProgressFn:
    """Bars unless ``quiet``."""
    return no_progress if quiet else rich_progress


@contextmanager
def deferred_progress(description: str, *, quiet: bool = False) -> Iterator[tuple[Callable[[int], None], Advance]]:
    """A progress bar whose total is learnt later (e.g. after a scan): yields ``(start(total), advance(n))``."""
    with ExitStack() as stack:
        bars: list[Advance] = []

        def start(total: int) -> None:
            bars.append(stack.enter_context(screen_progress(quiet)(description, total)))

        def advance(n: int = 1) -> None:
            bars[0](n)

        yield start, advance


class ConsoleHandler(logging.Handler):
    """Prints log records as plain lines on stderr; warnings in yellow, errors in red."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            console.print(self.format(record), style=STYLES.get(record.levelno), markup=False, highlight=False)
        except Exception:  # a logging handler must never raise into the caller
            self.handleError(record)


def setup_logging(*, quiet: bool = False) -> None:
    """Show brainscan's messages: everything from INFO, or only warnings and errors when ``quiet`` (skipped files
    are warnings, so they are never silent)."""
    logger = logging.getLogger("brainscan")
    for handler in [h for h in logger.handlers if isinstance(h, ConsoleHandler)]:
        logger.removeHandler(handler)
    logger.addHandler(ConsoleHandler())
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False
