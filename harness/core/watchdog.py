"""A deadline for a call that has none of its own: at the deadline, something that ends the wait is run.

paramiko waits for sshd's answer to "exec" with no timeout, and qemu.qmp for QEMU's greeting: closing
the channel, or shutting the socket down, from a timer thread ends either wait.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from types import TracebackType


class Watchdog:
    """``with Watchdog(seconds, action):`` runs *action* once if the block is still running after *seconds*;
    :attr:`fired` says whether it did (the block may also have finished just as it fired).  An ``OSError``
    from *action* (the channel or socket already gone) is ignored."""

    def __init__(self, seconds: float, action: Callable[[], object]) -> None:
        self._fired = threading.Event()

        def fire() -> None:
            self._fired.set()
            with contextlib.suppress(OSError):
                action()

        self._timer = threading.Timer(max(0.0, seconds), fire)
        self._timer.daemon = True

    @property
    def fired(self) -> bool:
        return self._fired.is_set()

    def __enter__(self) -> Watchdog:
        self._timer.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._timer.cancel()
