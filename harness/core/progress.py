"""Progress for long work: a live line on a terminal, plain timestamped lines otherwise (CI logs)."""

from __future__ import annotations

import enum
import sys
import threading
import time
from typing import Self, TextIO


class _LiveLine:
    """One status line redrawn twice a second on a terminal (a context manager: the ticker
    stops and the line is cleared on exit); subclasses say what the line reads."""

    WIDTH = 160

    def __init__(self, title: str, stream: TextIO | None = None, *, tty: bool | None = None) -> None:
        self.title = title
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.started_at = time.monotonic()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._ticker: threading.Thread | None = None

    def line(self) -> str:
        raise NotImplementedError

    def __enter__(self) -> Self:
        if self.tty:
            self._ticker = threading.Thread(target=self._tick, daemon=True, name="nestbed-progress")
            self._ticker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=2)
            with self._lock:
                self.stream.write("\r\033[K")
                self.stream.flush()

    def _write_live(self) -> None:
        self.stream.write("\r\033[K" + self.line()[:self.WIDTH])
        self.stream.flush()

    def _tick(self) -> None:
        while not self._stop.wait(0.5):
            with self._lock:
                self._write_live()


class StepProgress(_LiveLine):
    """Call with a message for each step; on a TTY the current step shows a running clock."""

    def __init__(self, title: str, stream: TextIO | None = None) -> None:
        super().__init__(title, stream)
        self.step = ""

    def line(self) -> str:
        return f"nestbed: [{time.monotonic() - self.started_at:5.1f}s] {self.title}: {self.step}"

    def __call__(self, message: str) -> None:
        with self._lock:
            self.step = message
            if self.tty:
                self._write_live()
            else:
                self.stream.write(self.line() + "\n")
                self.stream.flush()


def _fmt_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class CellProgress(_LiveLine):
    """Progress over a known number of cells (tests): done/total, outcomes, the running cell, ETA.

    On a terminal one live line is redrawn twice a second; otherwise (CI logs) one plain line is
    written per finished cell.  Feed it with :meth:`set_total`, :meth:`started`, :meth:`finished`;
    use it as a context manager.  The ETA is the mean wall time per finished cell so far times the
    cells left (with parallel workers that mean already reflects the parallelism).
    """

    def __init__(self, title: str, stream: TextIO | None = None, *, tty: bool | None = None) -> None:
        super().__init__(title, stream, tty=tty)
        self.total: int | None = None
        self.done = 0
        self.outcomes: dict[str, int] = {}
        self.running: list[str] = []

    def eta(self) -> float | None:
        """Seconds left, or None before the first cell finished."""
        if not self.done or self.total is None:
            return None
        elapsed = time.monotonic() - self.started_at
        return elapsed / self.done * max(0, self.total - self.done)

    def line(self) -> str:
        elapsed = time.monotonic() - self.started_at
        total = "?" if self.total is None else str(self.total)
        counts = ", ".join(f"{n} {o}" for o, n in sorted(self.outcomes.items()))
        eta = self.eta()
        parts = [f"nestbed: [{elapsed:6.1f}s] {self.title}: {self.done}/{total} cells"]
        if counts:
            parts.append(f"({counts})")
        if eta is not None:
            parts.append(f"ETA {_fmt_eta(eta)}")
        if self.running:
            more = f" (+{len(self.running) - 1})" if len(self.running) > 1 else ""
            parts.append(f"| {self.running[-1]}{more}")
        return " ".join(parts)

    def set_total(self, total: int) -> None:
        with self._lock:
            self.total = total
            if not self.tty:
                self.stream.write(f"nestbed: {self.title}: {total} cells\n")
                self.stream.flush()

    def started(self, cell: str) -> None:
        with self._lock:
            if cell not in self.running:
                self.running.append(cell)

    def finished(self, cell: str, outcome: str, seconds: float | None = None) -> None:
        with self._lock:
            if cell in self.running:
                self.running.remove(cell)
            self.done += 1
            self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
            if self.tty:
                if outcome in ("fail", "error"):  # failures stay on screen above the live line
                    self.stream.write(f"\r\033[Knestbed: {outcome.upper()} {cell}\n")
                self._write_live()
            else:
                took = f" ({seconds:.1f} s)" if seconds is not None else ""
                eta = self.eta()
                self.stream.write(f"nestbed: [{time.monotonic() - self.started_at:6.1f}s] "
                                  f"{self.done}/{self.total if self.total is not None else '?'} {outcome:5} "
                                  f"{cell}{took}{'' if eta is None else ', ETA ' + _fmt_eta(eta)}\n")
                self.stream.flush()


class Event(enum.StrEnum):
    """The events of a report run's ``progress.jsonl`` (written by the plugin, read by ``nestbed report``)."""

    BEGIN = "begin"    # the session started
    TOTAL = "total"    # n: how many cells were collected
    START = "start"    # nodeid: a cell began
    DONE = "done"      # nodeid, outcome, seconds: a cell ended
    END = "end"        # report: index.html's path, summary: the counts


PROGRESS_FILE = "progress.jsonl"
