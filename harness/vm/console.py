"""The serial console: a drained socket, logged from the first byte, read with pexpect.

QEMU's serial chardev is one end of a socketpair the harness creates before launch, so
no byte the guest prints can be lost to a connection race.  A reader thread drains the
socket continuously (a guest never stalls on a full socket buffer), appends every
byte to the log file, and queues it for :class:`SocketSpawn`, a pexpect spawn whose
``read_nonblocking`` takes from that queue (the shape of pexpect's own PopenSpawn).
"""

from __future__ import annotations

import queue
import socket
import threading
import time
from pathlib import Path
from typing import IO

import pexpect
from pexpect.spawnbase import SpawnBase

READ_CHUNK = 65536
TAIL_BYTES = 16384


class SocketSpawn(SpawnBase):
    """A pexpect spawn over a connected socket, fed by a draining thread."""

    def __init__(self, sock: socket.socket, logfile: IO[bytes], *, timeout: float = 30.0, note: bytes = b"") -> None:
        super().__init__(timeout=timeout, maxread=READ_CHUNK, searchwindowsize=None,
                         encoding="utf-8", codec_errors="replace")
        self._sock = sock
        self._log = logfile
        self._queue: queue.Queue[tuple[bytes, float] | None] = queue.Queue()
        self.arrived_at = 0.0  # monotonic arrival time of the newest chunk handed to pexpect
        self._tail = bytearray(note)  # e.g. "[nestbed] restored from a saved state": the tail says so too
        self._tail_lock = threading.Lock()
        self._reader = threading.Thread(target=self._drain, name="nestbed-serial", daemon=True)
        self._reader.start()
        self._eof = False

    def _drain(self) -> None:
        try:
            while True:
                try:
                    data = self._sock.recv(READ_CHUNK)
                except OSError:
                    data = b""
                if not data:
                    break
                self._log.write(data)
                self._log.flush()
                with self._tail_lock:
                    self._tail += data
                    del self._tail[:-TAIL_BYTES]
                self._queue.put((data, time.monotonic()))
        finally:
            self._queue.put(None)

    def tail(self) -> str:
        """The last bytes the guest printed (whether or not anyone read them yet)."""
        with self._tail_lock:
            return bytes(self._tail).decode("utf-8", "replace")

    def read_nonblocking(self, size: int = 1, timeout: float | None = -1) -> str:
        if self._eof:
            raise pexpect.EOF("serial console closed")
        if timeout == -1:
            timeout = self.timeout
        chunks: list[bytes] = []
        try:
            item = self._queue.get(timeout=timeout) if timeout is None or timeout > 0 \
                else self._queue.get_nowait()
        except queue.Empty:
            raise pexpect.TIMEOUT("no serial output") from None
        while True:
            if item is None:
                self._eof = True
                break
            chunks.append(item[0])
            self.arrived_at = item[1]
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
        if not chunks:
            self.flag_eof = True
            raise pexpect.EOF("serial console closed")
        data = b"".join(chunks)
        text: str = self._decoder.decode(data, final=False)
        return text

    def send(self, s: str | bytes) -> int:
        data = s.encode() if isinstance(s, str) else s
        self._sock.sendall(data)
        return len(data)

    def sendline(self, s: str = "") -> int:
        return self.send(s + "\n")

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._reader.join(timeout=5)


def open_log(path: Path) -> IO[bytes]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "wb", buffering=0)  # noqa: SIM115 - closed by the Machine
