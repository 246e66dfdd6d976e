"""Progress reporting for long conversion stages, kept apart from the work itself.

The pipeline reports stages through a ``Reporter``; the CLI passes a rich one that draws bars on
stderr, ``--json`` and library callers get the silent default, so no output ever mixes with the
machine-readable report on stdout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["NullReporter", "Reporter", "RichReporter"]

Advance = Callable[[int], None]


class Reporter:
    """Base: a stage is a context manager yielding an ``advance(n)`` callable."""

    @contextmanager
    def stage(self, description: str, total: int | None = None) -> Iterator[Advance]:
        yield lambda n: None

    def note(self, message: str) -> None:
        """A one-line remark (a warning about a variant, a skipped step)."""


class NullReporter(Reporter):
    pass


class RichReporter(Reporter):
    """Rich progress bars on a console (stderr in the CLI)."""

    def __init__(self, console: Any) -> None:
        self.console = console

    @contextmanager
    def stage(self, description: str, total: int | None = None) -> Iterator[Advance]:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        ) as progress:
            task = progress.add_task(description, total=total)

            def advance(n: int) -> None:
                progress.advance(task, n)

            yield advance
            if total is not None:
                progress.update(task, completed=total)

    def note(self, message: str) -> None:
        self.console.print(message)
