"""Rich console output and progress bars, silenced by ``quiet``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


@contextmanager
def progress(description: str, total: int, *, quiet: bool = False) -> Iterator[Callable[[int], None]]:
    """A progress bar; yields ``advance(n)``. Quiet runs get a no-op."""
    if quiet:
        yield lambda n=1: None
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
    )
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(description, total=total, status="")
        yield lambda n=1: bar.advance(task, n)


@contextmanager
def deferred_progress(
    description: str, *, quiet: bool = False
) -> Iterator[tuple[Callable[[int], None], Callable[[int], None]]]:
    """A progress bar whose total is learnt later (e.g. after a scan): yields ``(start(total), advance(n))``."""
    with ExitStack() as stack:
        bars: list[Callable[[int], None]] = []

        def start(total: int) -> None:
            bars.append(stack.enter_context(progress(description, total, quiet=quiet)))

        def advance(n: int = 1) -> None:
            bars[0](n)

        yield start, advance


def info(message: str, *, quiet: bool = False) -> None:
    if not quiet:
        console.print(message)
