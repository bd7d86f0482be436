"""All output goes through here: a rich console, and a progress display that falls back to
plain periodic lines when stdout is not a terminal."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def info(message: str) -> None:
    console.print(message)


def error(message: str) -> None:
    """One clear message on stderr (markup in the message itself is not interpreted)."""
    err_console.print("[bold red]error:[/] ", end="")
    err_console.print(message, markup=False)


def warn(message: str) -> None:
    """A warning or note on stderr (markup in the message itself is not interpreted)."""
    err_console.print("[yellow]warning:[/] ", end="")
    err_console.print(message, markup=False)


class StepProgress:
    """Progress over `total` steps with free-form stats (loss, steps/s, ...) and an ETA."""

    def __init__(self, description: str, total: int, start: int = 0, enabled: bool = True):
        self.enabled, self.total, self.description = enabled, total, description
        self.live = enabled and console.is_terminal
        self._last_plain = time.monotonic()
        self._progress = None
        if self.live:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"), TimeRemainingColumn(), console=console)
            self._task = self._progress.add_task(description, total=total, completed=start, stats="")

    def __enter__(self):
        if self._progress:
            self._progress.start()
        return self

    def __exit__(self, *exc):
        if self._progress:
            self._progress.stop()

    def update(self, completed: int, stats: dict[str, str], force: bool = False) -> None:
        if not self.enabled:
            return
        text = "  ".join(f"{k} {v}" for k, v in stats.items())
        if self._progress:
            self._progress.update(self._task, completed=completed, stats=text)
        elif force or time.monotonic() - self._last_plain > 10:
            self._last_plain = time.monotonic()
            console.print(f"{self.description} {completed}/{self.total}  {text}")


def fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
