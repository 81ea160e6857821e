"""Terminal output: logging setup and progress bars that --quiet turns off."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from reid_deploy.errors import shown

console = Console(stderr=True)
log = logging.getLogger("reid")
_quiet = False


UNWRAPPED_WIDTH = 100_000  # console width when stderr is a file or a pipe: lines are never wrapped


class _OneLineFormatter(logging.Formatter):
    """One line per record: the message's own line breaks turned into spaces, other control characters (of
    file names, keys, broker payloads) escaped."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return shown(" ".join(super().formatMessage(record).splitlines()))


def setup(quiet: bool = False, debug: bool = False) -> None:
    """Logging for the CLI: rich records on a terminal; one unwrapped line per record into a file or pipe."""
    global _quiet
    _quiet = quiet
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    console.width = None if console.is_terminal else UNWRAPPED_WIDTH  # progress bars: one line each too
    if console.is_terminal:
        handler: logging.Handler = RichHandler(console=console, show_path=False, markup=False)
        handler.setFormatter(_OneLineFormatter("%(message)s", datefmt="[%X]"))
    else:
        handler = logging.StreamHandler(console.file)
        handler.setFormatter(_OneLineFormatter("[%(asctime)s] %(levelname)s %(message)s", datefmt="%X"))
    logging.basicConfig(level=level, handlers=[handler], force=True)


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
