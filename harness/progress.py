"""Progress for long work: a live line on a terminal, plain timestamped lines otherwise (CI logs)."""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO


class StepProgress:
    """Call with a message for each step; on a TTY the current step shows a running clock.

    Use as a context manager so the ticker stops and the line is finished.
    """

    def __init__(self, title: str, stream: TextIO | None = None) -> None:
        self.title = title
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.started = time.monotonic()
        self.step = ""
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._ticker: threading.Thread | None = None

    def __enter__(self) -> StepProgress:
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

    def _line(self) -> str:
        return f"nestbed: [{time.monotonic() - self.started:5.1f}s] {self.title}: {self.step}"

    def _tick(self) -> None:
        while not self._stop.wait(0.5):
            with self._lock:
                self.stream.write("\r\033[K" + self._line()[: 150])
                self.stream.flush()

    def __call__(self, message: str) -> None:
        with self._lock:
            self.step = message
            if self.tty:
                self.stream.write("\r\033[K" + self._line()[: 150])
            else:
                self.stream.write(self._line() + "\n")
            self.stream.flush()
