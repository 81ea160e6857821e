"""Terminal output: logging setup and progress bars that --quiet turns off."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

console = Console(stderr=True)
log = logging.getLogger("reid")
_quiet = False


def setup(quiet: bool = False, debug: bool = False) -> None:
    global _quiet
    _quiet = quiet
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(console=console, show_path=False, markup=False)], force=True)


@contextmanager
def progress(description: str, total: int | None) -> Iterator["ProgressTask"]:
    """A progress bar for ``total`` steps; ``advance(n, **fields)`` moves it and updates its text."""
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console,
                   disable=_quiet, transient=False)
    with bar:
        task = bar.add_task(description, total=total, info="")
        yield ProgressTask(bar, task)


class ProgressTask:
    def __init__(self, bar: Progress, task: int):
        self._bar, self._task = bar, task

    def advance(self, steps: int = 1, **info: object) -> None:
        text = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items())
        self._bar.update(self._task, advance=steps, **({"info": text} if info else {}))
