"""Progress bars for a data provider's phases, on stderr; silent when disabled."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.progress import (
    Progress as RichProgress,
)


class PhaseBar:
    def __init__(self, progress: RichProgress | None, task: TaskID | None) -> None:
        self._progress = progress
        self._task = task

    def advance(self, amount: int) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, amount)


class Progress:
    """Phase-by-phase progress (reading, uploading, waiting, writing)."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled

    @contextmanager
    def phase(self, label: str, *, total: int | None) -> Iterator[PhaseBar]:
        if not self.enabled:
            yield PhaseBar(None, None)
            return
        columns = [
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        ]
        with RichProgress(*columns, console=Console(stderr=True), transient=False) as progress:
            task = progress.add_task(label, total=total)
            yield PhaseBar(progress, task)
            if total is not None:
                progress.update(task, completed=total)
