"""Progress bars for a data provider's phases, on stderr; silent when disabled."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # rich is imported only when bars are shown (--quiet starts faster)
    from rich.progress import Progress as RichProgress
    from rich.progress import TaskID

log = logging.getLogger("teepsi.client")


@contextmanager
def timed(name: str) -> Iterator[None]:
    """Log ``timing: NAME SECONDS s (cpu SECONDS s)`` at DEBUG, with the figures also as
    the structured fields ``phase``, ``wall_s`` and ``cpu_s`` (bench/run.py reads those)."""
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        wall_s, cpu_s = time.perf_counter() - wall, time.process_time() - cpu
        log.debug(
            "timing: %s %.3f s (cpu %.3f s)",
            name,
            wall_s,
            cpu_s,
            extra={"phase": name, "wall_s": round(wall_s, 3), "cpu_s": round(cpu_s, 3)},
        )


class PhaseBar:
    def __init__(self, progress: RichProgress | None, task: TaskID | None) -> None:
        self._progress = progress
        self._task = task

    def advance(self, amount: int) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, amount)

    def show(self, completed: int, total: int, description: str) -> None:
        """Set the bar (e.g. parties uploaded of the job's parties) and its label."""
        if self._progress is not None and self._task is not None:
            self._progress.update(
                self._task, completed=completed, total=total, description=description
            )


class Progress:
    """Phase-by-phase progress (reading, uploading, waiting, writing)."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled

    @contextmanager
    def phase(self, label: str, *, total: int | None) -> Iterator[PhaseBar]:
        """A bar for one phase, named in timing lines by the label's first word."""
        with timed(label.split()[0]):
            if not self.enabled:
                yield PhaseBar(None, None)
                return
            with self._bar(label, total) as bar:
                yield bar

    @contextmanager
    def _bar(self, label: str, total: int | None) -> Iterator[PhaseBar]:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RichProgress

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
