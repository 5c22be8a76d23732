"""Progress of a benchmark run on stderr: one line per step, updated by the measuring processes."""

from __future__ import annotations

import logging
import sys

log = logging.getLogger(__name__)


class Display:
    """A rich progress bar over the run's steps (plain log lines where rich is not installed)."""

    def __init__(self, steps: int):
        self.steps = steps
        self.current = ""
        self._progress = None
        self._task = None
        self._handlers: list[logging.Handler] = []

    def __enter__(self) -> Display:
        try:
            from rich import progress as rp
            from rich.console import Console
        except ImportError:
            return self
        console = Console(file=sys.stderr)
        self._progress = rp.Progress(rp.SpinnerColumn(), rp.TextColumn("{task.description}"), rp.BarColumn(),
                                     rp.MofNCompleteColumn(), rp.TimeElapsedColumn(), console=console)
        self._progress.start()
        self._task = self._progress.add_task("starting", total=self.steps)
        self._route_logs(console)
        return self

    def __exit__(self, *exc) -> None:
        if self._progress:
            self._progress.update(self._task, completed=self.steps)
            self._progress.stop()
            root = logging.getLogger()
            for handler in list(root.handlers):
                root.removeHandler(handler)
            for handler in self._handlers:
                root.addHandler(handler)

    def set_total(self, steps: int) -> None:
        self.steps = steps
        if self._progress:
            self._progress.update(self._task, total=steps)

    def step(self, name: str) -> None:
        """Start the next step (the previous one counts as done)."""
        if self._progress and self.current:
            self._progress.advance(self._task)
        self.current = name
        self._show(name)

    def note(self, text: str) -> None:
        """What the current step is doing now."""
        self._show(f"{self.current}: {text}" if self.current else text)

    def _show(self, text: str) -> None:
        if self._progress:
            self._progress.update(self._task, description=text)
        else:
            log.info("%s", text)

    def _route_logs(self, console) -> None:
        """While the bar is live, log records go through rich so that they print above it."""
        from rich.logging import RichHandler

        root = logging.getLogger()
        self._handlers = list(root.handlers)
        for handler in self._handlers:
            root.removeHandler(handler)
        root.addHandler(RichHandler(console=console, show_path=False, show_time=False))
