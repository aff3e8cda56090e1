"""Console output: progress bars and one-line notes, on stderr so stdout stays clean for data."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from .processes import is_main

console = Console(stderr=True)


def note(message: str) -> None:
    """A line for the user; of a job of several processes, process 0 alone speaks."""
    if is_main():
        console.print(message, highlight=False, soft_wrap=True)


@dataclass
class Bar:
    progress: Progress
    task: TaskID

    def advance(self, amount: int) -> None:
        self.progress.advance(self.task, amount)

    def status(self, text: str) -> None:
        """Free text after the counts, e.g. a throughput."""
        self.progress.update(self.task, status=text)


@contextmanager
def progress_bar(description: str, total: int, unit: str = "rows") -> Iterator[Bar]:
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )
    with progress:
        yield Bar(progress, progress.add_task(description, total=total, status=""))
