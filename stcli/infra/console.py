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


PLAIN_EVERY_S = 10  # without a terminal: a progress line at most this often, during long items too


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
        self.completed, self.stats = completed, stats
        text = "  ".join(f"{k} {v}" for k, v in stats.items())
        if self._progress:
            self._progress.update(self._task, completed=completed, stats=text)
        elif force or time.monotonic() - self._last_plain > PLAIN_EVERY_S:
            self._last_plain = time.monotonic()
            console.print(f"{self.description} {completed}/{self.total}  {text}")

    def beat(self, inside: str) -> None:
        """Progress inside the current item (a sampler step, the ODE time reached): shown live,
        or as a plain line when none was printed for PLAIN_EVERY_S, so a long batch is never
        silent."""
        if self.enabled:
            self.update(getattr(self, "completed", 0), {**getattr(self, "stats", {}), "now": inside})

    def beating(self, score_fn, total: int | None = None):
        """`score_fn` reporting each evaluation: its count in the batch and the time t; with the
        batch's `total` count known (a fixed grid), also of how many and the batch's ETA."""
        if not self.enabled:
            return score_fn
        count, start = 0, time.monotonic()

        def score(x, t):
            nonlocal count
            count += 1
            now = float(t.max()) if hasattr(t, "max") else float(t)
            if total is None:
                self.beat(f"NFE {count} at t {now:.3g}")
            elif count == 1:
                self.beat(f"NFE 1/{total} at t {now:.3g}")
            else:  # the evaluations so far time the rest of the batch
                left = (time.monotonic() - start) / (count - 1) * (total - count + 1)
                self.beat(f"NFE {count}/{total} at t {now:.3g}, batch eta {fmt_eta(left)}")
            return score_fn(x, t)

        return score


def fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
